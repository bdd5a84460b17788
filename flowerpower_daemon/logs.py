"""structlog set-up, done once by the entry points (never at import time).

JSON lines on stderr when not on a terminal (journald, files, CI), a
coloured console format on a TTY. ``run_id``, ``pipeline`` and ``trigger``
are bound per run with ``structlog.contextvars``. URL passwords never reach
the output (:func:`~flowerpower_daemon.redact.redact_event` runs last).

When stderr is journald's stream (``JOURNAL_STREAM`` names its device and
inode, as systemd sets it), every line starts with its syslog priority, e.g.
``<3>`` for an error (sd-daemon(3)): journald strips the prefix and files the
line at that level, so ``journalctl -p err`` shows only the errors.

The CLI's project commands (``cli=True``) show a warning or error event that
carries a ``message`` for people (e.g. ``config_key_has_no_effect``) as that
one plain line, ``warning: <message>``, like the CLI's own ``error:`` lines;
the daemon and workers keep the structured line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Literal

import orjson
import structlog

from .redact import redact_event

__all__ = ["configure_logging", "journald_stream", "print_error"]

LogFormat = Literal["auto", "json", "console"]

# sd-daemon(3)'s SD_ERR ... SD_DEBUG, by structlog's level names.
_PRIORITY: Mapping[str, str] = {
    "critical": "<2>",
    "exception": "<3>",
    "error": "<3>",
    "warning": "<4>",
    "warn": "<4>",
    "info": "<6>",
    "debug": "<7>",
}


def journald_stream(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is the journal's: ``JOURNAL_STREAM`` is its ``device:inode``.

    systemd sets the variable for a service whose output goes to the journal;
    a child whose stderr was redirected elsewhere inherits it but no longer
    matches, so only the comparison says where the lines really go.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
        device, inode = (int(part) for part in value.split(":", 1))
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _json_line(obj: object, *, default: Callable[[object], object] | None = None) -> str:
    """A log line's JSON, by orjson (structlog's default, ``json.dumps``, took ~15 us of
    the ~35 us an INFO line costs; one per run at the default level). What orjson
    cannot encode (an int beyond 64 bits, say) goes to ``json.dumps`` as before."""
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(obj, default=default)


def _with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """``renderer``'s lines, each prefixed with the event's syslog priority."""

    def render(logger: object, name: str, event_dict: MutableMapping[str, object]) -> str:
        prefix = _PRIORITY.get(str(event_dict.get("level", name)), "<6>")
        text = renderer(logger, name, event_dict)
        if not isinstance(text, str):
            text = text.decode() if isinstance(text, bytes) else str(text)
        return _prefixed(prefix, text)

    return render


def _prefixed(prefix: str, text: str) -> str:
    """Every line of ``text`` with ``prefix``: the journal makes each line an entry."""
    return prefix + text.replace("\n", "\n" + prefix)


#: The levels whose events with a ``message`` the CLI prints as plain lines, and their prefix.
_USER_LEVELS: Mapping[str, str] = {"warning": "warning", "warn": "warning", "error": "error"}


def _user_lines(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """``renderer``, except that a warning or error carrying a ``message`` for people is
    the plain ``warning: <message>`` line a person at a terminal reads (CLI commands)."""

    def render(
        logger: object, name: str, event_dict: MutableMapping[str, object]
    ) -> str | bytes | bytearray | Mapping[str, object] | tuple[object, ...]:
        message = event_dict.get("message")
        prefix = _USER_LEVELS.get(str(event_dict.get("level", name)))
        if prefix is not None and isinstance(message, str):
            return f"{prefix}: {message}"
        return renderer(logger, name, event_dict)

    return render


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, for the user (no log format); under journald
    filed at error level like the log lines (see the module doc)."""
    text = f"error: {message}"
    if journald_stream(sys.stderr):
        text = _prefixed("<3>", text)
    sys.stderr.write(text + "\n")


def configure_logging(level: str = "INFO", fmt: LogFormat = "auto", *, cli: bool = False) -> None:
    """Route structlog and stdlib logging to stderr at ``level`` in the chosen format
    (``cli``: events with a ``message`` for people as plain lines, see the module doc)."""
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
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared.append(redact_event)
    if cli:
        renderer = _user_lines(renderer)
    if journald_stream(sys.stderr):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: print() writes the line and its newline apart, so a stdlib
        # record (its handler has another lock) could land between them, two lines in one.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
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
    receiver = logging.getLogger("taskiq.receiver.receiver")
    if not any(isinstance(f, _NotCancellations) for f in receiver.filters):
        receiver.addFilter(_NotCancellations())


class _NotCancellations(logging.Filter):
    """Drops taskiq's error (with a traceback) for a run cancelled on purpose: a second
    stop signal, ``flowerpowerctl cancel``. The daemon reports those itself, as a
    ``cancelled`` result; a pipeline's own errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)
