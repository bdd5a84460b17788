"""``flowerpower-daemon run|check|worker``: load the settings, start the process,
map errors to exit codes (2 = bad config)."""

from __future__ import annotations

import sys

import anyio

from ..errors import ConfigError, FlowerPowerError
from ..redact import redact_url
from ..settings import load_settings
from .check import check_report
from .daemon import Daemon

__all__ = ["main"]


def main(command: str, config: str | None, log_level: str | None) -> int:
    """``run``, ``check`` and ``worker``; maps errors to exit codes (2 = bad config)."""
    from ..logs import configure_logging

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    configure_logging(log_level or settings.log_level, settings.log_format)
    if command == "check":
        report = check_report(settings)
        for p in report.warnings:
            print(f"warning: {redact_url(str(p))} (no trigger runs this pipeline)", file=sys.stderr)
        if report.errors:
            print(f"{len(report.errors)} problem(s):", file=sys.stderr)
            for p in report.errors:
                print(f"  - {redact_url(str(p))}", file=sys.stderr)
            return 2
        print(f"ok: {len(settings.triggers)} trigger(s), project {settings.project}")
        return 0
    try:
        if command == "worker":
            from .worker import run_worker

            anyio.run(run_worker, settings)
        else:
            anyio.run(Daemon(settings, config_path=config).serve)
    except FlowerPowerError as exc:  # ConfigError included
        print(f"error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
