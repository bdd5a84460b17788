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


def main(command: str, config: str | None, log_level: str | None) -> int:
    """``run`` and ``worker``; maps errors to exit codes (2 = bad config)."""
    settings = process_settings(config, log_level)
    if settings is None:
        return 2
    try:
        # Off (and free) unless OTEL_TRACES_EXPORTER names an exporter.
        tracing.configure("flowerpower-worker" if command == "worker" else "flowerpower-daemon")
        if command == "worker":
            from .worker import run_worker

            anyio.run(run_worker, settings)
        else:
            anyio.run(Daemon(settings, config_path=config).serve)
    except FlowerPowerError as exc:  # ConfigError included
        print_error(redact_url(str(exc)))
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
