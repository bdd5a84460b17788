"""Small parsers shared by the project model and the command lines; stdlib and orjson only.

Kept dependency-light on purpose: ``flowerpowerctl`` imports this and must
not pull in pydantic, croniter or Hamilton.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import orjson

__all__ = [
    "EXECUTOR_ALIASES",
    "Parser",
    "executor_arg",
    "inputs_arg",
    "json_arg",
    "names_arg",
    "parse_inputs",
    "parse_seconds",
]

#: FlowerPower's executor names that are ours under another name.
EXECUTOR_ALIASES = {"synchronous": "local"}

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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def json_arg(name: str, expected: type | tuple[type, ...]) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses JSON and checks its type.

    argparse names the option in its message, so ``name`` is only used by
    callers outside argparse (kept for them).
    """
    del name

    def parse(text: str) -> Any:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
        if not isinstance(value, expected):
            kind = expected.__name__ if isinstance(expected, type) else "JSON value"
            raise argparse.ArgumentTypeError(f"expected a JSON {kind}, got {text!r}")
        return value

    return parse


def _scalar(text: str) -> Any:
    """One ``key=value`` value: a JSON literal when it is one (5, 2.5, true, null, [1]), else text.

    FlowerPower keeps such values as strings except ``true``/``false`` (any
    case); we also read numbers, ``null`` and JSON arrays/objects, so
    ``count=5`` reaches an ``int`` input as 5. Quote to keep text:
    ``code="007"``.
    """
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def parse_inputs(text: str) -> dict[str, Any]:
    """``--inputs``: a JSON object, a Python dict literal, or ``key=value,key2=value2``.

    The same forms FlowerPower's CLI reads, tried in its order (ValueError).
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        json_error: str | None = str(exc)
    else:
        if isinstance(value, dict):
            return value
        raise ValueError(f"expected a JSON object or key=value pairs, got {text!r}")
    if text.lstrip().startswith("{"):
        try:
            literal = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            raise ValueError(f"not valid JSON ({json_error})") from None
        if isinstance(literal, dict) and all(isinstance(k, str) for k in literal):
            return literal
        raise ValueError(f"expected a JSON object, got {text!r}")
    out: dict[str, Any] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"expected a JSON object or key=value pairs, got {text!r} "
                f"({pair.strip()!r} has no key=)"
            )
        out[key.strip()] = _scalar(raw.strip())
    return out


def inputs_arg(text: str) -> dict[str, Any]:
    """:func:`parse_inputs` as an argparse ``type=``."""
    try:
        return parse_inputs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def names_arg(text: str) -> list[str]:
    """A list of names: a JSON array of strings or ``a,b,c`` (FlowerPower's ``--final-vars``)."""
    stripped = text.strip()
    if stripped.startswith("["):
        value = json_arg("", list)(stripped)
        if not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected names (strings), got {text!r}")
        return list(value)
    names = [n.strip().strip("'\"") for n in stripped.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected a JSON array or a,b,c, got {text!r}")
    return names


def executor_arg(text: str) -> dict[str, Any]:
    """``--executor``: a type name (``threadpool``, FlowerPower's ``synchronous``) or a JSON object.

    Returns the executor block, e.g. ``{"type": "threadpool", "max_workers": 4}``.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        value = json_arg("--executor", dict)(stripped)
    else:
        value = {"type": stripped}
    kind = value.get("type")
    if isinstance(kind, str):
        value["type"] = EXECUTOR_ALIASES.get(kind.lower(), kind.lower())
    return dict(value)
