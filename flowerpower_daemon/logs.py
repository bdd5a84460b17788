"""structlog set-up, done once by the entry points (never at import time).

JSON lines on stderr when not on a terminal (journald, files, CI), a
coloured console format on a TTY. ``run_id``, ``pipeline`` and ``trigger``
are bound per run with ``structlog.contextvars``. URL passwords never reach
the output (:func:`~flowerpower_daemon.redact.redact_event` runs last).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from .redact import redact_event

__all__ = ["configure_logging"]

LogFormat = Literal["auto", "json", "console"]


def configure_logging(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Route structlog and stdlib logging to stderr at ``level`` in the chosen format."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared.append(redact_event)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party chatter that is noise at INFO.
    for name in ("hamilton", "taskiq", "aiomqtt", "amqtt", "watchfiles", "transitions"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
