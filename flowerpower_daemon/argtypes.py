"""Small parsers shared by the project model and the command lines; stdlib and orjson only.

Kept dependency-light on purpose: ``flowerpowerctl`` imports this and must
not pull in pydantic, croniter or Hamilton.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn, TypeVar

import orjson

__all__ = [
    "CRON_FIELDS",
    "EXECUTOR_ALIASES",
    "INTERVAL_UNITS",
    "RUN_OVERRIDES",
    "MergeInputs",
    "Parser",
    "add_run_options",
    "cache_arg",
    "cron_arg",
    "cron_fields_text",
    "executor_arg",
    "inputs_arg",
    "interval_arg",
    "json_arg",
    "names_arg",
    "parse_inputs",
    "parse_seconds",
    "run_overrides",
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


_T = TypeVar("_T")


def _json_as(text: str, expected: type[_T] | tuple[type[_T], ...]) -> _T:
    """``text`` parsed as JSON, which must be an ``expected`` (ArgumentTypeError otherwise)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, expected):
        kind = expected.__name__ if isinstance(expected, type) else "JSON value"
        raise argparse.ArgumentTypeError(f"expected a JSON {kind}, got {text!r}")
    return value


def json_arg(name: str, expected: type | tuple[type, ...]) -> Callable[[str], object]:
    """An argparse ``type=`` that parses JSON and checks its type.

    argparse names the option in its message, so ``name`` is only used by
    callers outside argparse (kept for them).
    """
    del name

    def parse(text: str) -> object:
        return _json_as(text, expected)

    return parse


def _scalar(text: str) -> object:
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


def parse_inputs(text: str) -> dict[str, object]:
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
    out: dict[str, object] = {}
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


def inputs_arg(text: str) -> dict[str, object]:
    """:func:`parse_inputs` as an argparse ``type=``."""
    try:
        return parse_inputs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class MergeInputs(argparse.Action):
    """``--inputs`` given more than once: the objects merged in order (a later key wins)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        del parser, option_string
        earlier = getattr(namespace, self.dest, None)
        merged = dict(earlier) if isinstance(earlier, dict) else {}
        if isinstance(values, dict):
            merged.update(values)
        setattr(namespace, self.dest, merged)


def names_arg(text: str) -> list[str]:
    """A list of names: a JSON array of strings or ``a,b,c`` (FlowerPower's ``--final-vars``)."""
    stripped = text.strip()
    if stripped.startswith("["):
        value = _json_as(stripped, list)
        if not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected names (strings), got {text!r}")
        return list(value)
    names = [n.strip().strip("'\"") for n in stripped.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected a JSON array or a,b,c, got {text!r}")
    return names


#: ``run:`` override names (as :func:`add_run_options` stores them) besides executor/log level.
RUN_OVERRIDES = (
    "final_vars",
    "config",
    "cache",
    "with_adapter",
    "max_retries",
    "retry_delay",
    "retry_backoff",
    "jitter_factor",
    "retry_exceptions",
    "timeout",
)


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The run options given on the command line, named as ``FlowerPowerProject.request`` does.

    ``--max-workers`` is folded into ``executor``; ``--log-level`` becomes
    ``log_level`` (upper case). Options not given are left out.
    """
    out = {k: getattr(args, k) for k in RUN_OVERRIDES if getattr(args, k, None) is not None}
    executor: dict[str, object] | None = dict(args.executor) if args.executor else None
    if args.max_workers is not None:
        executor = {"type": "local", **(executor or {}), "max_workers": args.max_workers}
    if executor is not None:
        out["executor"] = executor
    if args.run_log_level:
        out["log_level"] = args.run_log_level.upper()
    return out


def cache_arg(text: str) -> bool | dict[str, object]:
    """``--cache``: ``true``/``false`` (any case) or a JSON cache block."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    value = _json_as(text, (dict, bool))
    if isinstance(value, dict):
        return value
    return bool(value)  # JSON true or false


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The run options of ``pipeline run``, ``flowerpowerctl run`` and ``schedule add``.

    Each overrides a key of the pipeline's ``run:`` block; :func:`run_overrides`
    collects the given ones.
    """
    run.add_argument(
        "--inputs",
        type=inputs_arg,
        action=MergeInputs,
        default=None,
        help="inputs: a JSON object or key=value,key2=value2 (values read as JSON when they "
        "are: 5, 2.5, true, null; else text); given more than once, merged in order "
        "(a later key wins)",
    )
    run.add_argument(
        "--final-vars",
        "--outputs",
        "-o",
        dest="final_vars",
        type=names_arg,
        default=None,
        help="outputs to compute: a JSON array or a,b,c (default: run.final_vars)",
    )
    run.add_argument(
        "--config", type=json_arg("--config", dict), default=None, help="Hamilton config, JSON"
    )
    run.add_argument(
        "--cache",
        nargs="?",
        const=True,
        type=cache_arg,
        default=None,
        help="cache nodes: true, false, or a JSON cache block (bare --cache = true)",
    )
    run.add_argument(
        "--executor",
        type=executor_arg,
        default=None,
        help="local (or synchronous), threadpool, processpool, ray, dask, or JSON such as "
        '\'{"type": "threadpool", "max_workers": 4}\'',
    )
    run.add_argument(
        "--max-workers", type=int, default=None, help="executor.max_workers (threads/processes)"
    )
    run.add_argument(
        "--with-adapter",
        type=json_arg("--with-adapter", dict),
        default=None,
        help='adapters to switch on or off, JSON: \'{"progressbar": true}\'',
    )
    run.add_argument(
        "--max-retries", type=int, default=None, help="attempts after the first (0 = no retry)"
    )
    run.add_argument(
        "--retry-delay", type=float, default=None, help="seconds before the first retry"
    )
    run.add_argument(
        "--retry-backoff", type=float, default=None, help="factor the delay grows by per retry"
    )
    run.add_argument(
        "--jitter-factor", type=float, default=None, help="random share added to a delay (0-1)"
    )
    run.add_argument(
        "--retry-exceptions",
        type=names_arg,
        default=None,
        help="exception names to retry on: a JSON array or a,b (default Exception)",
    )
    run.add_argument(
        "--timeout", type=float, default=None, help="seconds one attempt may take"
    )
    run.add_argument(
        "--log-level",
        "--run-log-level",
        "--pipeline-log-level",
        dest="run_log_level",
        default=None,
        help="log level of the run (DEBUG also prints a failing node's traceback)",
    )


def executor_arg(text: str) -> dict[str, object]:
    """``--executor``: a type name (``threadpool``, FlowerPower's ``synchronous``) or a JSON object.

    Returns the executor block, e.g. ``{"type": "threadpool", "max_workers": 4}``.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        value = _json_as(stripped, dict)
    else:
        value = {"type": stripped}
    kind = value.get("type")
    if isinstance(kind, str):
        value["type"] = EXECUTOR_ALIASES.get(kind.lower(), kind.lower())
    return dict(value)


#: FlowerPower's (APScheduler's) cron fields, in the order of a 6-field cron string.
CRON_FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week")


def cron_arg(text: str) -> str:
    """``--cron``: a cron string, or FlowerPower's field dict ``{"minute": "*/5"}``.

    A dict becomes a 6-field string, seconds first (``second`` defaults to 0,
    the others to ``*``); the daemon validates the expression.
    """
    if not text.strip().startswith("{"):
        return text
    fields = _json_as(text, dict)
    unknown = sorted(set(fields) - set(CRON_FIELDS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown cron field(s) {', '.join(unknown)}; fields: {', '.join(CRON_FIELDS)}"
        )
    return cron_fields_text(fields)


def cron_fields_text(fields: Mapping[str, object]) -> str:
    """A cron field dict as a 6-field string, seconds first: ``second`` defaults to 0 (at
    most once a minute, like a 5-field string), the others to ``*``."""
    return " ".join(str(fields.get(f, "0" if f == "second" else "*")) for f in CRON_FIELDS)


#: Seconds per unit of FlowerPower's interval dict (``{"minutes": 5}``).
INTERVAL_UNITS = {
    "weeks": 604800.0,
    "days": 86400.0,
    "hours": 3600.0,
    "minutes": 60.0,
    "seconds": 1.0,
    "milliseconds": 0.001,
}


def interval_arg(text: str) -> str | float:
    """``--interval``: ``30s``, ``5m`` or seconds as is; ``{"minutes": 5}`` -> 300.0."""
    if not text.strip().startswith("{"):
        return text
    fields = _json_as(text, dict)
    unknown = sorted(set(fields) - set(INTERVAL_UNITS))
    bad = [k for k, v in fields.items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if unknown or bad or not fields:
        raise argparse.ArgumentTypeError(
            f"expected numbers for {', '.join(INTERVAL_UNITS)}, got {text!r}"
        )
    return sum(float(v) * INTERVAL_UNITS[k] for k, v in fields.items())
