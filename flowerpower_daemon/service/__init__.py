"""The processes: the daemon's wiring and lifecycle, the worker, reload, systemd."""
