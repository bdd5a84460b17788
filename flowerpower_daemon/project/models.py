"""The run request and run result that flow from triggers to the runner to the sinks.

Plain slotted dataclasses (no pydantic on the hot path), treated as
immutable by convention: ``frozen=True`` would route every field through
``object.__setattr__`` and double the cost of building one, which the runner
does several times per run. Both serialise to JSON-ready dicts so that taskiq can
carry a request to a worker on another machine and sinks can publish a result.
"""

from __future__ import annotations

import base64
import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "AttemptInfo",
    "ErrorInfo",
    "RunRequest",
    "RunResult",
    "RunStatus",
    "TriggerInfo",
    "UnknownInputs",
    "new_run_id",
    "utcnow",
]

_getrandbits = random.getrandbits

RunStatus = Literal["success", "failed", "cancelled", "timeout"]
TriggerType = Literal["mqtt", "cron", "interval", "date", "file", "manual"]
UnknownInputs = Literal["error", "ignore"]
#: Origins whose requests carry fields no pipeline need take (payload fields, file events).
_LENIENT_TRIGGERS = frozenset(("mqtt", "file"))


def new_run_id() -> str:
    """A fresh unique id for a run: 128 random bits as 32 hex digits (like ``uuid4().hex``).

    Drawn from ``random`` (seeded from the OS, reseeded in forked children)
    rather than ``os.urandom``: no system call on the per-run hot path, and a
    run id is an identifier, not a secret.
    """
    return f"{_getrandbits(128):032x}"


utcnow: Callable[[], datetime] = functools.partial(datetime.now, UTC)
"""The current time, timezone-aware in UTC (a partial: one C call on the per-run path)."""


@dataclass(slots=True)
class TriggerInfo:
    """What caused a run: the trigger's name and type, plus transport details.

    Timer runs carry ``scheduled``, the fire time they are for (ISO 8601, without
    jitter), and ``catch_up`` when they make up for a fire missed while the daemon
    was down.
    """

    name: str = "manual"
    type: TriggerType = "manual"
    topic: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    file_path: str | None = None
    scheduled: str | None = None
    catch_up: bool = False

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "type": self.type}
        if self.topic is not None:
            out["topic"] = self.topic
        if self.fields:
            out["fields"] = dict(self.fields)
        if self.file_path is not None:
            out["file_path"] = self.file_path
        if self.scheduled is not None:
            out["scheduled"] = self.scheduled
        if self.catch_up:
            out["catch_up"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TriggerInfo:
        return cls(
            name=data.get("name", "manual"),
            type=data.get("type", "manual"),
            topic=data.get("topic"),
            fields=dict(data.get("fields") or {}),
            file_path=data.get("file_path"),
            scheduled=data.get("scheduled"),
            catch_up=bool(data.get("catch_up", False)),
        )


@dataclass(slots=True)
class RunRequest:
    """One requested run of a pipeline.

    ``inputs`` are the request's own inputs (highest precedence, merged key by
    key over ``run.inputs`` and ``params``). ``overrides`` holds ``run:`` keys
    (``final_vars``, ``config``, ``cache``, ``executor``, ``max_retries``,
    ``timeout`` ...) that replace the pipeline's YAML values for this run.
    ``reply`` carries where the result should go (a sink's business).

    ``unknown_inputs`` says what an input no node takes does: ``"error"`` (an
    InputError listing the pipeline's inputs) or ``"ignore"``; unset, MQTT
    and file triggers ignore them (a payload carries more than a pipeline
    needs) and every other origin (CLI, API, ``flowerpowerctl``, schedules)
    errs. ``required_inputs`` names inputs the pipeline must take even so:
    an MQTT payload that is not a JSON object becomes the one input the
    trigger's ``payload_input`` names, and dropping it would run on the
    defaults as if the message said nothing (an InputError instead).
    ``traceback`` asks for the failing node's traceback in
    ``RunResult.error.traceback``. ``trace`` is the run's OpenTelemetry
    context when tracing is on (see :mod:`flowerpower_daemon.tracing`).
    """

    pipeline: str
    inputs: Mapping[str, object] = field(default_factory=dict)
    overrides: Mapping[str, object] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)
    trigger: TriggerInfo = field(default_factory=TriggerInfo)
    queued_at: datetime = field(default_factory=utcnow)
    reply: Mapping[str, object] = field(default_factory=dict)
    dedup_key: str | None = None
    unknown_inputs: UnknownInputs | None = None
    traceback: bool = False
    required_inputs: tuple[str, ...] = ()
    trace: Mapping[str, str] | None = None

    @property
    def ignores_unknown_inputs(self) -> bool:
        """Whether inputs no node takes are dropped rather than an error (see the class doc)."""
        if self.unknown_inputs is None:
            return self.trigger.type in _LENIENT_TRIGGERS
        return self.unknown_inputs == "ignore"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "pipeline": self.pipeline,
            "inputs": _pack_inputs(self.inputs),
            "overrides": dict(self.overrides),
            "run_id": self.run_id,
            "trigger": self.trigger.to_dict(),
            "queued_at": self.queued_at.isoformat(),
            "reply": dict(self.reply),
            "dedup_key": self.dedup_key,
        }
        if self.unknown_inputs is not None:
            out["unknown_inputs"] = self.unknown_inputs
        if self.traceback:
            out["traceback"] = True
        if self.required_inputs:
            out["required_inputs"] = list(self.required_inputs)
        if self.trace:
            out["trace"] = dict(self.trace)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRequest:
        return cls(
            pipeline=data["pipeline"],
            inputs=_unpack_inputs(data.get("inputs") or {}),
            overrides=dict(data.get("overrides") or {}),
            run_id=data.get("run_id") or new_run_id(),
            trigger=TriggerInfo.from_dict(data.get("trigger") or {}),
            queued_at=datetime.fromisoformat(data["queued_at"])
            if data.get("queued_at")
            else utcnow(),
            reply=dict(data.get("reply") or {}),
            dedup_key=data.get("dedup_key"),
            unknown_inputs=data.get("unknown_inputs"),
            traceback=bool(data.get("traceback", False)),
            required_inputs=tuple(data.get("required_inputs") or ()),
            trace=_trace_carrier(data.get("trace")),
        )


def _trace_carrier(value: object) -> dict[str, str] | None:
    """``RunRequest.trace`` from a message: string keys and values only, else none."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} or None


_BYTES = "__fp_bytes_b64__"


def _pack_inputs(inputs: Mapping[str, object]) -> dict[str, object]:
    """The inputs, JSON-ready: a ``bytes`` value (an MQTT ``payload: bytes|auto`` input)
    becomes ``{"__fp_bytes_b64__": …}`` so it reaches the runner as the same bytes.

    taskiq's message model would turn bytes into text and fail on bytes that are
    not UTF-8, losing the run.
    """
    out = dict(inputs)
    for key, value in out.items():
        if type(value) is bytes:
            out[key] = {_BYTES: base64.b64encode(value).decode("ascii")}
    return out


def _unpack_inputs(inputs: Mapping[str, object]) -> dict[str, object]:
    out = dict(inputs)
    for key, value in out.items():
        if type(value) is dict and len(value) == 1 and _BYTES in value:
            out[key] = base64.b64decode(value[_BYTES])
    return out


@dataclass(slots=True)
class ErrorInfo:
    """Why a run failed: exception type, message and the DAG node that raised, if known.

    ``traceback`` is the failing node's traceback text, kept only when the
    request asked for it (``RunRequest.traceback``).
    """

    type: str
    message: str
    node: str | None = None
    retryable: bool = True
    traceback: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.type, "message": self.message}
        if self.node is not None:
            out["node"] = self.node
        if self.traceback is not None:
            out["traceback"] = self.traceback
        return out

    @classmethod
    def from_exception(cls, exc: BaseException, node: str | None = None) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc), node=node)


@dataclass(slots=True)
class AttemptInfo:
    """One attempt of a run: when it ran and how it ended."""

    number: int
    started_at: datetime
    finished_at: datetime
    status: RunStatus
    error: ErrorInfo | None = None

    @property
    def duration_ms(self) -> float:
        return (self.finished_at - self.started_at).total_seconds() * 1000.0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "number": self.number,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
        }
        if self.error is not None:
            out["error"] = self.error.to_dict()
        return out


@dataclass(slots=True)
class RunResult:
    """The outcome of a run, as published on MQTT and kept in the job history."""

    run_id: str
    pipeline: str
    status: RunStatus
    outputs: Mapping[str, object]
    error: ErrorInfo | None
    attempts: tuple[AttemptInfo, ...]
    queued_at: datetime
    started_at: datetime
    finished_at: datetime
    trigger: TriggerInfo = field(default_factory=TriggerInfo)
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    #: The whole message as JSON, kept by ``encoding.encode_result`` so that the MQTT
    #: sink, the job history and the dedup store do not each encode it again.
    encoded: bytes | None = field(default=None, repr=False, compare=False)
    #: Where the run executed: ``<hostname>:<pid>`` of the worker (or of the daemon itself).
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @classmethod
    def not_run(
        cls,
        request: RunRequest,
        status: RunStatus,
        error: ErrorInfo,
        *,
        started: datetime | None = None,
        exception: BaseException | None = None,
    ) -> RunResult:
        """The result of a request that did not (or not fully) run: bad input, cancelled."""
        now = utcnow()
        begin = started or now
        return cls(
            run_id=request.run_id,
            pipeline=request.pipeline,
            status=status,
            outputs={},
            error=error,
            attempts=(AttemptInfo(1, begin, now, status, error),),
            queued_at=request.queued_at,
            started_at=begin,
            finished_at=now,
            trigger=request.trigger,
            exception=exception,
        )

    @property
    def duration_ms(self) -> float:
        return (self.finished_at - self.started_at).total_seconds() * 1000.0

    def to_dict(
        self, *, include_attempts: bool = False, raw_times: bool = False
    ) -> dict[str, object]:
        """The result message (README, "Results") (outputs still raw: encode with ``encoding``).

        ``raw_times`` leaves ``queued_at``, ``started_at`` and ``finished_at`` as
        ``datetime`` objects for a caller that encodes with orjson: it writes the
        same text as ``isoformat()`` (``+00:00``, microseconds unless zero) at a
        fraction of the cost, three times on every run's hot path.
        """
        if raw_times:
            queued: object = self.queued_at
            started: object = self.started_at
            finished: object = self.finished_at
        else:
            queued = self.queued_at.isoformat()
            started = self.started_at.isoformat()
            finished = self.finished_at.isoformat()
        out: dict[str, object] = {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "trigger": self.trigger.to_dict(),
            "outputs": dict(self.outputs),
            "error": self.error.to_dict() if self.error else None,
            "attempts": len(self.attempts),
            "queued_at": queued,
            "started_at": started,
            "finished_at": finished,
            "duration_ms": round(self.duration_ms, 3),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        if include_attempts:
            out["attempt_log"] = [a.to_dict() for a in self.attempts]
        return out
