"""Credentials out of URLs, wherever a URL may be shown: log lines, status, errors.

``redis://:s3cret@host/0`` becomes ``redis://:***@host/0`` and
``mqtt://user:pw@broker`` becomes ``mqtt://user:***@broker``. One helper for
every place that prints a URL, plus a structlog processor (installed by
:func:`~flowerpower_daemon.logs.configure_logging`) that applies it to every
string field of every log line, tracebacks included: a password is printed
nowhere, whichever message happens to carry it.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping

__all__ = ["redact_event", "redact_url"]

# scheme://[user]:password@ -- the password ends at the last "@" before the host part.
# Mistyped URLs too (``mqtt:/u:pw@h``, ``redis//:pw@h``): they end up in error messages.
_CREDENTIALS = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*(?::/{0,2}|//)[^:/?#@\s]*):[^/?#\s]*@"
)


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message or traceback that holds URLs) with every URL password
    replaced by ``***``; unchanged when it has none."""
    return _CREDENTIALS.sub(r"\g<head>:***@", text) if "@" in text else text


def redact_event(
    logger: object, method: str, event: MutableMapping[str, object]
) -> MutableMapping[str, object]:
    """structlog processor: :func:`redact_url` on each string field (a cheap ``@`` test first)."""
    for key, value in event.items():
        if type(value) is str and "@" in value:
            event[key] = redact_url(value)
        elif type(value) is list:
            event[key] = [redact_url(v) if type(v) is str and "@" in v else v for v in value]
    return event
