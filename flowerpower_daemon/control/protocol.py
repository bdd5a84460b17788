"""The control protocol: newline-delimited JSON over a Unix stream socket.

One request per line, ``{"id": 1, "cmd": "status", "args": {}}``; one answer
per request with the same ``id``::

    {"id": 1, "ok": true, "result": {...}}
    {"id": 1, "ok": false, "error": {"code": "not_found", "message": "...", "details": ...}}

``id`` is any JSON string or integer the client picks (``null`` when the
request could not be read). Requests on one connection are answered in
order. Streaming commands (``events``) first answer ``{"id": 1, "ok": true,
"result": {"stream": true}}``, then send one ``{"id": 1, "event": {...}}``
line per event until the client closes the connection. A line longer than
the server's limit gets a ``too_large`` error and the connection is closed
(the stream cannot be re-synchronised); any other bad line gets an error and
the connection stays usable.

Shared by the daemon and ``flowerpowerctl``: standard library and orjson only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Required, TypedDict

import orjson

__all__ = [
    "COMMANDS",
    "ERROR_CODES",
    "PROTOCOL_VERSION",
    "ArgSpec",
    "DagArgs",
    "IdArgs",
    "JobsArgs",
    "Message",
    "ProtocolError",
    "Request",
    "RequestId",
    "RunArgs",
    "ScheduleAddArgs",
    "TargetArgs",
    "dump_line",
    "error_message",
    "event_message",
    "ok_message",
    "parse_request",
    "validate_args",
]

PROTOCOL_VERSION: Final = 1

#: A request's ``id``: a JSON string or integer the client picks; ``None`` when unreadable.
RequestId = str | int | None
#: One protocol line, as sent (answers and events).
Message = Mapping[str, object]

#: Every error code an answer can carry, and what it means.
ERROR_CODES: Final[Mapping[str, str]] = {
    "bad_json": "the line is not a JSON object",
    "bad_request": "the object lacks a valid 'id', 'cmd' or 'args'",
    "unknown_command": "no such command",
    "bad_args": "an argument is missing, unknown or of the wrong type",
    "too_large": "the request line is longer than the server's limit",
    "forbidden": "the peer's uid/gid is not allowed to use the socket",
    "busy": "too many clients are connected",
    "not_found": "no such pipeline, job, trigger or schedule",
    "conflict": "the request contradicts the current state (exists, finished, ...)",
    "invalid": "an argument has the right type but a bad value (cron, date, pipeline inputs)",
    "reload_failed": "the new config was not applied; 'details' lists the problems",
    "unavailable": "the daemon is starting or stopping",
    "internal": "a bug in the daemon; it is logged and the daemon goes on",
}

_JSON_TYPES: Final = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One argument of a command: its JSON types and whether it must be given."""

    types: tuple[str, ...]
    required: bool = False

    def accepts(self, value: object) -> bool:
        for name in self.types:
            tp = _JSON_TYPES[name]
            # bool is an int in Python, not in JSON; an int is a fine float.
            if name in ("int", "float") and isinstance(value, bool):
                continue
            if isinstance(value, tp) or (name == "float" and isinstance(value, int)):
                return True
        return False


def _a(*types: str, required: bool = False) -> ArgSpec:
    return ArgSpec(types, required)


#: Command -> its arguments. The daemon rejects anything else with ``bad_args``.
COMMANDS: Final[Mapping[str, Mapping[str, ArgSpec]]] = {
    "ping": {},
    "status": {"fleet": _a("bool")},
    "pipelines": {},
    "triggers": {},
    "run": {
        "pipeline": _a("str", required=True),
        "inputs": _a("object", "null"),
        "final_vars": _a("array", "null"),
        "config": _a("object", "null"),
        "run": _a("object", "null"),
        "run_in": _a("float", "null"),
        "run_at": _a("str", "null"),
        "wait": _a("bool"),
    },
    "jobs": {
        "pipeline": _a("str", "null"),
        "state": _a("str", "null"),
        "limit": _a("int", "null"),
    },
    "job": {"id": _a("str", required=True)},
    "dag": {
        "pipeline": _a("str", required=True),
        "final_vars": _a("array", "null"),
        "config": _a("object", "null"),
        "inputs": _a("object", "null"),
        "failed_node": _a("str", "null"),
        "run_path": _a("bool"),
    },
    "cancel": {"id": _a("str", required=True)},
    "schedules": {},
    "schedule_add": {
        "pipeline": _a("str", required=True),
        "cron": _a("str", "object", "null"),
        "interval": _a("str", "float", "object", "null"),
        "date": _a("str", "null"),
        "id": _a("str", "null"),
        "overwrite": _a("bool"),
        "inputs": _a("object", "null"),
        "timezone": _a("str", "null"),
        "run": _a("object", "null"),
    },
    "schedule_rm": {"id": _a("str", required=True)},
    "pause": {"id": _a("str", "null"), "all": _a("bool")},
    "resume": {"id": _a("str", "null"), "all": _a("bool")},
    "reload": {},
    "events": {},
    "stop": {"leave": _a("bool")},
}

# The arguments of each command as its handler sees them once :func:`validate_args` has
# checked them against :data:`COMMANDS` (absent optional arguments are missing keys).


class RunArgs(TypedDict, total=False):
    pipeline: Required[str]
    inputs: dict[str, object]
    final_vars: list[object]
    config: dict[str, object]
    run: dict[str, object]  # ``run:`` overrides, as a trigger's
    run_in: float
    run_at: str
    wait: bool


class DagArgs(TypedDict, total=False):
    """``dag``: DOT text of a pipeline's DAG (every node, or the path to ``final_vars``;
    ``run_path`` without them: to the pipeline's ``run.final_vars``)."""

    pipeline: Required[str]
    final_vars: list[object]
    config: dict[str, object]
    inputs: dict[str, object]
    failed_node: str
    run_path: bool


class JobsArgs(TypedDict, total=False):
    pipeline: str
    state: str
    limit: int


class IdArgs(TypedDict):
    id: str


class ScheduleAddArgs(TypedDict, total=False):
    pipeline: Required[str]
    cron: str | dict[str, object]  # a cron string or FlowerPower's field dict
    interval: str | float | dict[str, object]  # seconds, "5m", or {"minutes": 5}
    date: str
    id: str
    overwrite: bool
    inputs: dict[str, object]
    timezone: str
    run: dict[str, object]


class TargetArgs(TypedDict, total=False):
    id: str
    all: bool


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error answer with ``code``."""

    def __init__(
        self, code: str, message: str, *, request_id: RequestId = None, details: object = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request line."""

    id: RequestId
    cmd: str
    args: Mapping[str, object]


def parse_request(line: bytes) -> Request:
    """Parse and validate one request line (without its newline); raise :class:`ProtocolError`."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", f"expected a JSON object, got {type(data).__name__}")
    raw_id = data.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        raise ProtocolError("bad_request", "'id' must be a string or an integer")
    request_id: RequestId = raw_id
    unknown = sorted(set(data) - {"id", "cmd", "args"})
    if unknown:
        raise ProtocolError(
            "bad_request", f"unknown key(s) {', '.join(unknown)}", request_id=request_id
        )
    cmd = data.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("bad_request", "'cmd' must be a string", request_id=request_id)
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("bad_request", "'args' must be an object", request_id=request_id)
    return Request(request_id, cmd, validate_args(cmd, args, request_id=request_id))


def validate_args(
    cmd: str, args: Mapping[str, object], *, request_id: RequestId = None
) -> dict[str, object]:
    """Check ``args`` against :data:`COMMANDS`; missing optional ones are absent, not ``None``."""
    spec = COMMANDS.get(cmd)
    if spec is None:
        known = ", ".join(sorted(COMMANDS))
        raise ProtocolError(
            "unknown_command", f"unknown command {cmd!r} (commands: {known})", request_id=request_id
        )
    problems = [f"unknown argument {name!r}" for name in sorted(set(args) - set(spec))]
    for name, arg in spec.items():
        if name not in args:
            if arg.required:
                problems.append(f"missing argument {name!r}")
        elif not arg.accepts(args[name]):
            problems.append(
                f"argument {name!r} must be {' or '.join(arg.types)}, not {_json_type(args[name])}"
            )
    if problems:
        raise ProtocolError("bad_args", f"{cmd}: {'; '.join(problems)}", request_id=request_id)
    return {k: v for k, v in args.items() if v is not None}


def _json_type(value: object) -> str:
    for name, tp in _JSON_TYPES.items():
        if isinstance(value, tp) and not (name == "int" and isinstance(value, bool)):
            return name
    return type(value).__name__


def ok_message(request_id: RequestId, result: object) -> dict[str, object]:
    return {"id": request_id, "ok": True, "result": result}


def error_message(
    request_id: RequestId, code: str, message: str, details: object = None
) -> dict[str, object]:
    error: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"id": request_id, "ok": False, "error": error}


def event_message(request_id: RequestId, event: Mapping[str, object]) -> dict[str, object]:
    return {"id": request_id, "event": event}


def dump_line(message: object) -> bytes:
    """One protocol line (orjson; anything it cannot encode becomes its ``str``)."""
    return orjson.dumps(message, default=str, option=orjson.OPT_APPEND_NEWLINE)
