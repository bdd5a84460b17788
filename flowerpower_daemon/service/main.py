"""``flowerpower-daemon run|worker``: load the settings, start the process, map errors
to exit codes (2 = bad config). ``check`` is the CLI's own (``cli._check``)."""

from __future__ import annotations

import anyio

from .. import tracing
from ..errors import FlowerPowerError
from ..logs import print_error
from ..redact import redact_url
from .daemon import Daemon
from .lifecycle import process_settings

__all__ = ["main"]


def main(
    command: str, config: str | None, log_level: str | None, http: tuple[str, int] | None = None
) -> int:
    """``run`` and ``worker`` (``http``: the worker's ``--http``); maps errors to exit codes
    (2 = bad config)."""
    settings = process_settings(config, log_level)
    if settings is None:
        return 2
    if http is not None:
        from ..observe import EXTRA_HINT, extra_problem

        if extra_problem("--http") is not None:
            print_error(f"--http needs the metrics extra: {EXTRA_HINT}")
            return 2
    try:
        # Off (and free) unless OTEL_TRACES_EXPORTER names an exporter.
        tracing.configure("flowerpower-worker" if command == "worker" else "flowerpower-daemon")
        if command == "worker":
            from .worker import run_worker

            anyio.run(run_worker, settings, http)
        else:
            anyio.run(Daemon(settings, config_path=config).serve)
    except FlowerPowerError as exc:  # ConfigError included
        print_error(redact_url(str(exc)))
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
