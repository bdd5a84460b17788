"""Dynamic schedules, pause state and delayed runs, persisted in the state directory.

``flowerpowerctl schedule add`` creates a cron, interval or one-shot date
schedule at run time; ``pause``/``resume`` switch any trigger off and on;
``run --run-in/--run-at`` waits for its time. All survive a restart: they
live in ``<state_dir>/schedules.json``::

    {"version": 1,
     "schedules": [{"id": "...", "pipeline": "...", "kind": "cron", "spec": "*/5 * * * *",
                    "timezone": null, "inputs": {}, "run": {}, "created_at": "..."}],
     "paused": ["trigger-or-schedule-id", ...],
     "delayed": [{"run_at": "...", "request": {...}}]}

Writes are atomic (temporary file, fsync, rename, fsync of the directory)
and run in a worker thread, so the event loop never waits for the disk. A
file that cannot be read is moved aside (``schedules.json.corrupt-<time>``)
and the daemon starts without dynamic schedules rather than not at all.
A one-shot date schedule is removed once it has fired.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread
import orjson
import structlog
from pydantic import ValidationError

from ..project.models import RunRequest, utcnow
from ..settings import CronTrigger, DateTrigger, IntervalTrigger, TimerTrigger

__all__ = ["DelayedRun", "Schedule", "ScheduleKind", "ScheduleStore"]

log = structlog.get_logger("flowerpower_daemon.schedules")

ScheduleKind = Literal["cron", "interval", "date"]

_VERSION = 1
_KINDS: dict[str, ScheduleKind] = {"cron": "cron", "interval": "interval", "date": "date"}


@dataclass(frozen=True, slots=True)
class Schedule:
    """One dynamic schedule: run ``pipeline`` with ``inputs`` on ``spec`` of ``kind``."""

    id: str
    pipeline: str
    kind: ScheduleKind
    spec: str
    timezone: str | None = None
    inputs: Mapping[str, object] = field(default_factory=dict)
    created_at: str = ""
    run: Mapping[str, object] = field(default_factory=dict)  # ``run:`` overrides, as a trigger's

    def to_trigger(self) -> TimerTrigger:
        """The validated timer trigger; ``ValueError`` naming the bad value otherwise."""
        base: dict[str, object] = {
            "name": self.id,
            "pipeline": self.pipeline,
            "inputs": dict(self.inputs),
            "run": dict(self.run),
        }
        try:
            if self.kind == "cron":
                return CronTrigger.model_validate(
                    {"type": "cron", "cron": self.spec, "timezone": self.timezone, **base}
                )
            if self.kind == "interval":
                return IntervalTrigger.model_validate(
                    {"type": "interval", "every": self.spec, **base}
                )
            from ..project.schedule import parse_date, parse_timezone

            at = parse_date(self.spec, parse_timezone(self.timezone))
            return DateTrigger.model_validate({"type": "date", "at": at, **base})
        except ValidationError as exc:
            messages = "; ".join(str(e.get("msg", e)) for e in exc.errors())
            raise ValueError(f"schedule {self.id!r}: {messages}") from None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "kind": self.kind,
            "spec": self.spec,
            "timezone": self.timezone,
            "inputs": dict(self.inputs),
            "run": dict(self.run),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Schedule:
        """A schedule as :meth:`to_dict` wrote it (ValueError/KeyError/TypeError otherwise)."""
        raw = data["kind"]
        kind = _KINDS.get(raw) if isinstance(raw, str) else None
        if kind is None:
            raise ValueError(f"unknown schedule kind {raw!r}")
        zone = data.get("timezone")
        return cls(
            id=str(data["id"]),
            pipeline=str(data["pipeline"]),
            kind=kind,
            spec=str(data["spec"]),
            timezone=None if zone is None else str(zone),
            inputs=_object(data.get("inputs")),
            created_at=str(data.get("created_at") or ""),
            run=_object(data.get("run")),
        )

    @classmethod
    def new(
        cls,
        id: str,
        pipeline: str,
        kind: ScheduleKind,
        spec: str,
        *,
        timezone: str | None = None,
        inputs: Mapping[str, object] | None = None,
        run: Mapping[str, object] | None = None,
    ) -> Schedule:
        created = utcnow().isoformat()
        return cls(id, pipeline, kind, spec, timezone, dict(inputs or {}), created, dict(run or {}))


@dataclass(frozen=True, slots=True)
class DelayedRun:
    """A manual run waiting for its time (``flowerpowerctl run --run-in/--run-at``)."""

    request: RunRequest
    run_at: datetime

    def to_dict(self) -> dict[str, object]:
        return {"run_at": self.run_at.isoformat(), "request": self.request.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DelayedRun:
        """A delayed run as :meth:`to_dict` wrote it (ValueError/KeyError/TypeError otherwise)."""
        run_at = data["run_at"]
        if not isinstance(run_at, str):
            raise TypeError(f"run_at: expected an ISO 8601 string, got {run_at!r}")
        return cls(RunRequest.from_dict(_object(data["request"])), datetime.fromisoformat(run_at))


def _object(value: object) -> dict[str, object]:
    """A JSON object of the file as a dict (``null`` is empty); TypeError for anything else."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return dict(value)


class ScheduleStore:
    """The dynamic schedules and paused trigger names of one daemon, and their file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.schedules: dict[str, Schedule] = {}
        self.paused: set[str] = set()
        self.delayed: dict[str, DelayedRun] = {}  # run id -> the run
        self._lock = anyio.Lock()

    @classmethod
    def load(cls, state_dir: Path) -> ScheduleStore:
        """Read ``state_dir/schedules.json`` (blocking: call at start-up or in a thread)."""
        store = cls(state_dir / "schedules.json")
        try:
            data = orjson.loads(store.path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != _VERSION:
                raise ValueError(f"unsupported format (version {data.get('version')!r})")
            schedules = [Schedule.from_dict(s) for s in data.get("schedules") or []]
            paused = {str(p) for p in data.get("paused") or []}
            delayed = [DelayedRun.from_dict(d) for d in data.get("delayed") or []]
        except FileNotFoundError:
            return store
        except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            aside = store.path.with_name(f"{store.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                store.path.rename(aside)
            log.error(
                "schedules_file_unreadable",
                path=str(store.path),
                moved_to=str(aside),
                error=str(exc),
            )
            return store
        store.schedules = {s.id: s for s in schedules}
        store.paused = paused
        store.delayed = {d.request.run_id: d for d in delayed}
        return store

    def triggers(self) -> list[TimerTrigger]:
        """Every schedule as a trigger; invalid ones are logged and left out (not deleted)."""
        out: list[TimerTrigger] = []
        for schedule in self.schedules.values():
            try:
                out.append(schedule.to_trigger())
            except ValueError as exc:
                log.error("schedule_invalid_skipped", schedule=schedule.id, error=str(exc))
        return out

    async def save(self) -> None:
        """Write the current state atomically, off the event loop."""
        async with self._lock:
            data = orjson.dumps(
                {
                    "version": _VERSION,
                    "schedules": [s.to_dict() for s in self.schedules.values()],
                    "paused": sorted(self.paused),
                    "delayed": [d.to_dict() for d in self.delayed.values()],
                },
                option=orjson.OPT_INDENT_2,
            )
            await anyio.to_thread.run_sync(_write_atomic, self.path, data)

    def set_paused(self, names: Iterable[str], paused: bool) -> None:
        if paused:
            self.paused.update(names)
        else:
            self.paused.difference_update(names)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
