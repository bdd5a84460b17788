"""Small parsers shared by the project model and the command lines; stdlib and orjson only.

Kept dependency-light on purpose: ``flowerpowerctl`` imports this and must
not pull in pydantic, croniter or Hamilton.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["json_arg", "parse_seconds"]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)", re.IGNORECASE)
_UNITS = {"ms": 0.001, "w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_seconds(text: str) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"1h30m"``, ``"250ms"``, ``"2w"`` -> seconds (ValueError)."""
    compact = text.replace(" ", "")
    try:
        return float(compact)
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _DURATION_RE.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2).lower()]
        pos = match.end()
    if not compact or pos != len(compact):
        raise ValueError(f"invalid duration {text!r}; use seconds or a string like '30s', '1h30m'")
    return total


def json_arg(name: str, expected: type | tuple[type, ...]) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses JSON and checks its type, naming the option."""

    def parse(text: str) -> Any:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(value, expected):
            kind = expected.__name__ if isinstance(expected, type) else "JSON value"
            raise argparse.ArgumentTypeError(f"{name}: expected a JSON {kind}")
        return value

    return parse
