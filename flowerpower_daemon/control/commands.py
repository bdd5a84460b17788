"""What each control command does, on top of the running daemon.

:meth:`Commands.handle` is the control server's handler: it answers one
request on one connection. Every failure becomes an error answer (a
:class:`ProtocolError` with its code, a :class:`FlowerPowerError` as
``invalid``/``not_found``, anything else as ``internal`` plus a log line);
nothing a client sends can raise out of here. ``run --wait`` and ``events``
hold the connection until the run finishes or the client leaves, and stop
waiting as soon as the client closes its end.
"""

from __future__ import annotations

import functools
import inspect
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import cast

import anyio
import anyio.to_thread
import orjson
import structlog

from ..errors import (
    ConfigError,
    DependencyMissingError,
    FlowerPowerError,
    PipelineNotFoundError,
    clean_message,
)
from ..project.models import RunResult, utcnow
from ..project.schedule import parse_cron, parse_date, parse_interval
from ..project.visualize import dag_dot
from ..redact import redact_url
from ..settings import (
    CronTrigger,
    DateTrigger,
    IntervalTrigger,
    MqttTrigger,
    Trigger,
    validate_run_overrides,
)
from ..state.history import FINISHED_STATES
from ..state.schedules import Schedule, ScheduleKind
from ..version import __version__
from .api import (
    DaemonControl,
    FleetStatusInfo,
    JobSummary,
    ReloadReport,
    RunAnswer,
    StatusInfo,
    TriggerRow,
    TriggerStatus,
)
from .protocol import (
    PROTOCOL_VERSION,
    DagArgs,
    IdArgs,
    JobsArgs,
    ProtocolError,
    Request,
    RequestId,
    RunArgs,
    ScheduleAddArgs,
    TargetArgs,
    error_message,
    event_message,
    ok_message,
)
from .server import Connection

__all__ = ["Commands"]

log = structlog.get_logger("flowerpower_daemon.control")

ACTIVE_STATES = ("scheduled", "queued", "running")
MAX_LIMIT = 1000

Args = Mapping[str, object]  # checked against protocol.COMMANDS before a handler sees them
Handler = Callable[[Args, Connection, RequestId], Awaitable[object]]
#: A history record or an active job's summary (history rows are plain JSON objects).
JobRow = Mapping[str, object]
_STREAMED = object()
#: Commands that make sense before the daemon is ready.
_ALWAYS = frozenset({"ping", "status", "stop", "events"})
#: How long ``status`` with ``fleet`` collects the daemons' retained status messages.
FLEET_WAIT = 0.5


class Commands:
    """The handlers of every command in :data:`~.protocol.COMMANDS`."""

    def __init__(self, daemon: DaemonControl) -> None:
        self.daemon = daemon
        self._handlers: dict[str, Handler] = {
            "ping": self.ping,
            "status": self.status,
            "pipelines": self.pipelines,
            "triggers": self.triggers,
            "run": self.run,
            "jobs": self.jobs,
            "job": self.job,
            "dag": self.dag,
            "cancel": self.cancel,
            "schedules": self.schedules,
            "schedule_add": self.schedule_add,
            "schedule_rm": self.schedule_rm,
            "pause": self.pause,
            "resume": self.resume,
            "reload": self.reload,
            "events": self.events,
            "stop": self.stop,
        }

    async def handle(self, request: Request, conn: Connection) -> None:
        """Answer one request; never raises for anything the client did."""
        handler = self._handlers[request.cmd]
        rid = request.id
        try:
            if not self.daemon.ready and request.cmd not in _ALWAYS:
                raise ProtocolError("unavailable", "the daemon is still starting; try again")
            if request.cmd == "events" or (request.cmd == "run" and request.args.get("wait")):
                result = await _until_closed(conn, handler(request.args, conn, rid))
                if result is None:
                    return  # the client left
            else:
                result = await handler(request.args, conn, rid)
            if result is not _STREAMED:
                await conn.send(ok_message(rid, result))
        except ProtocolError as exc:
            await conn.send(_error(rid, exc.code, exc.message, exc.details))
        except ConfigError as exc:
            details = [p.as_dict() for p in exc.problems]
            await conn.send(_error(rid, "invalid", str(exc), details))
        except (PipelineNotFoundError, LookupError) as exc:
            await conn.send(_error(rid, "not_found", str(exc)))
        except (FlowerPowerError, ValueError) as exc:
            await conn.send(_error(rid, "invalid", str(exc)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError):
            raise
        except Exception as exc:
            log.exception("control_command_failed", cmd=request.cmd)
            await conn.send(_error(rid, "internal", f"{type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ info

    async def ping(self, args: Args, conn: Connection, rid: RequestId) -> object:
        return {"pong": True, "version": __version__, "protocol": PROTOCOL_VERSION}

    async def status(
        self, args: Args, conn: Connection, rid: RequestId
    ) -> StatusInfo | FleetStatusInfo:
        info = self.daemon.status()
        if not args.get("fleet"):
            return info
        try:
            daemons = await self.daemon.fleet_status(FLEET_WAIT)
        except ConnectionError as exc:
            raise ProtocolError("unavailable", f"fleet status: {exc}") from None
        workers = cast(Mapping[str, object], info).get("workers")
        return {
            **info,
            "fleet": {
                "topic": self.daemon.settings.mqtt.fleet_status_filter,
                "wait_s": FLEET_WAIT,
                "daemons": daemons,
                "workers": list(workers) if isinstance(workers, list) else [],
            },
        }

    async def pipelines(self, args: Args, conn: Connection, rid: RequestId) -> object:
        by_pipeline: dict[str, list[str]] = {}
        for trig in self.daemon.triggers():
            by_pipeline.setdefault(trig.cfg.pipeline, []).append(trig.cfg.name)
        out = []
        for name, cfg in sorted(self.daemon.project.pipelines.items()):
            sched = cfg.schedule
            when = (
                sched.cron
                or (str(sched.interval) if sched.interval else None)
                or (sched.date.isoformat() if sched.date else None)
            )
            out.append(
                {
                    "name": name,
                    "final_vars": list(cfg.run.final_vars),
                    "executor": cfg.run.executor.type,
                    "schedule": when,
                    "triggers": by_pipeline.get(name, []),
                }
            )
        return out

    async def triggers(self, args: Args, conn: Connection, rid: RequestId) -> list[TriggerRow]:
        return [_trigger_row(trig) for trig in self.daemon.triggers()]

    async def schedules(self, args: Args, conn: Connection, rid: RequestId) -> list[TriggerRow]:
        return [
            _schedule_row(trig)
            for trig in self.daemon.triggers()
            if isinstance(trig.cfg, CronTrigger | IntervalTrigger | DateTrigger)
        ]

    # ------------------------------------------------------------------ runs

    async def run(self, args: Args, conn: Connection, rid: RequestId) -> RunAnswer:
        a = cast(RunArgs, args)
        d = self.daemon
        pipeline = a["pipeline"]
        if pipeline not in d.project.pipelines:
            raise PipelineNotFoundError(pipeline, d.project.pipelines)
        if "run_in" in a and "run_at" in a:
            raise ProtocolError("bad_args", "run: give 'run_in' or 'run_at', not both")
        run_at = None
        if "run_in" in a:
            if a["run_in"] < 0:
                raise ProtocolError("invalid", "run: 'run_in' must be >= 0 seconds")
            run_at = utcnow() + timedelta(seconds=a["run_in"])
        elif "run_at" in a:
            run_at = parse_date(a["run_at"])
        wait = bool(a.get("wait"))
        if wait and d.settings.queue.is_redis:
            raise ProtocolError(
                "conflict",
                "run --wait needs queue.broker: memory (with Redis, a worker runs it; "
                "follow it with 'flowerpowerctl job ID')",
            )
        overrides = _run_overrides("run", a)
        inputs = dict(a.get("inputs") or {})
        await self._check_inputs(pipeline, inputs, overrides)  # refused now, not run to fail
        request = d.manual_request(pipeline, inputs, overrides)
        state = await d.submit_run(request, run_at=run_at)
        if not wait:
            return {
                "run_id": request.run_id,
                "state": state,
                "run_at": run_at.isoformat() if run_at else None,
            }
        result = await d.wait_run(request.run_id)
        if result is None:
            record = await self._history_record(request.run_id)
            if record is None:
                raise ProtocolError("internal", f"run {request.run_id} ended without a result")
            return {
                "run_id": request.run_id,
                "state": str(record["state"]),
                "result": record["result"],
            }
        return {"run_id": request.run_id, "state": result.status, "result": _result_json(result)}

    async def jobs(self, args: Args, conn: Connection, rid: RequestId) -> list[JobRow]:
        a = cast(JobsArgs, args)
        limit = a.get("limit", 20)
        if not 1 <= limit <= MAX_LIMIT:
            raise ProtocolError("invalid", f"jobs: 'limit' must be 1..{MAX_LIMIT}")
        state = a.get("state")
        known = (*ACTIVE_STATES, *FINISHED_STATES)
        if state is not None and state not in known:
            raise ProtocolError(
                "invalid", f"jobs: unknown state {state!r} (states: {', '.join(known)})"
            )
        pipeline = a.get("pipeline")
        active: list[JobSummary] = [
            j.summary()
            for j in self.daemon.active_runs().values()
            if (pipeline is None or j.request.pipeline == pipeline)
            and (state is None or j.state == state)
        ]
        active.sort(key=lambda r: r["queued_at"], reverse=True)
        rows: list[JobRow] = [dict(r) for r in active[:limit]]
        history = self.daemon.history
        if history is not None and len(rows) < limit and state not in ACTIVE_STATES:
            rows += await history.recent(
                pipeline=pipeline, states=(state,) if state else (), limit=limit - len(rows)
            )
        return rows

    async def job(self, args: Args, conn: Connection, rid: RequestId) -> JobRow:
        run_id = cast(IdArgs, args)["id"]
        active = self.daemon.active_runs().get(run_id)
        if active is not None:
            return {**active.summary(), "request": active.request.to_dict()}
        record = await self._history_record(run_id)
        if record is None:
            raise ProtocolError("not_found", f"no job {run_id!r} (active or in the history)")
        return record

    async def dag(self, args: Args, conn: Connection, rid: RequestId) -> object:
        """DOT text of a pipeline's DAG (``runs show --dag``): built in a worker thread,
        drawn by the client (the daemon needs no ``dot`` program)."""
        a = cast(DagArgs, args)
        project = self.daemon.project
        if a["pipeline"] not in project.pipelines:
            raise PipelineNotFoundError(a["pipeline"], project.pipelines)
        names = a.get("final_vars") or []
        if not all(isinstance(n, str) for n in names):
            raise ProtocolError("bad_args", "dag: 'final_vars' must be an array of names")
        draw = functools.partial(
            dag_dot,
            project.runner,
            a["pipeline"],
            config=a.get("config"),
            final_vars=[str(n) for n in names],
            inputs=a.get("inputs"),
            failed_node=a.get("failed_node"),
            run_path=bool(a.get("run_path")),
        )
        try:
            picture = await anyio.to_thread.run_sync(draw)
        except DependencyMissingError as exc:
            raise ProtocolError("invalid", f"on the daemon's machine: {exc}") from None
        return picture.to_dict()

    async def cancel(self, args: Args, conn: Connection, rid: RequestId) -> object:
        d = self.daemon
        run_id = cast(IdArgs, args)["id"]
        if not await d.cancel_run(run_id):
            record = await self._history_record(run_id)
            if record is not None:
                raise ProtocolError("conflict", f"job {run_id} already finished: {record['state']}")
            raise ProtocolError("not_found", f"no active job {run_id!r}")
        with anyio.move_on_after(5):
            await d.wait_run(run_id)
        record = await self._history_record(run_id)
        return {"run_id": run_id, "state": record["state"] if record else "cancelling"}

    # ------------------------------------------------------------- schedules

    async def schedule_add(self, args: Args, conn: Connection, rid: RequestId) -> object:
        a = cast(ScheduleAddArgs, args)
        d = self.daemon
        kind, spec = _schedule_spec(a)
        pipeline = a["pipeline"]
        if pipeline not in d.project.pipelines:
            raise PipelineNotFoundError(pipeline, d.project.pipelines)
        sid = a.get("id") or f"{pipeline}-{uuid.uuid4().hex[:8]}"
        if sid in d.schedules.schedules:
            if not a.get("overwrite"):
                raise ProtocolError(
                    "conflict", f"schedule {sid!r} exists; use --overwrite to replace it"
                )
        elif any(t.cfg.name == sid for t in d.triggers()):
            raise ProtocolError(
                "conflict", f"{sid!r} is a trigger from the config file or project; pick another id"
            )
        inputs = dict(a.get("inputs") or {})
        overrides = _run_overrides("schedule_add", a)
        schedule = Schedule.new(
            sid, pipeline, kind, spec, timezone=a.get("timezone"), inputs=inputs, run=overrides
        )
        try:
            schedule.to_trigger()
        except ValueError as exc:
            reason = str(exc).removeprefix(f"schedule {sid!r}: ")
            raise ProtocolError("invalid", f"schedule_add: {reason}") from None
        await self._check_inputs(pipeline, inputs, overrides)
        await d.add_schedule(schedule)
        row = next((t for t in d.triggers() if t.cfg.name == sid), None)
        return _schedule_row(row) if row is not None else schedule.to_dict()

    async def schedule_rm(self, args: Args, conn: Connection, rid: RequestId) -> object:
        d = self.daemon
        sid = cast(IdArgs, args)["id"]
        if sid not in d.schedules.schedules:
            if any(t.cfg.name == sid for t in d.triggers()):
                raise ProtocolError(
                    "conflict", f"{sid!r} comes from the config file or project: edit it and reload"
                )
            raise ProtocolError("not_found", f"no dynamic schedule {sid!r}")
        await d.remove_schedule(sid)
        return {"removed": sid}

    async def pause(self, args: Args, conn: Connection, rid: RequestId) -> object:
        return {"paused": await self.daemon.set_paused(self._targets("pause", args), True)}

    async def resume(self, args: Args, conn: Connection, rid: RequestId) -> object:
        return {"resumed": await self.daemon.set_paused(self._targets("resume", args), False)}

    # -------------------------------------------------------------- lifecycle

    async def reload(self, args: Args, conn: Connection, rid: RequestId) -> ReloadReport:
        try:
            return await self.daemon.reload()
        except ConfigError as exc:
            raise ProtocolError(
                "reload_failed",
                f"kept the running config: {len(exc.problems)} problem(s) in the new one",
                details=[p.as_dict() for p in exc.problems],
            ) from None

    async def stop(self, args: Args, conn: Connection, rid: RequestId) -> object:
        leave = bool(args.get("leave", False))
        daemon = self.daemon
        if leave and daemon.stopping and not daemon.leaving:
            # It may be past unsubscribing; a leave now could not keep its promise.
            raise ProtocolError(
                "conflict",
                "already stopping without --leave: its broker session is kept for its"
                " return; to leave, start it again and run stop --leave",
            )
        daemon.request_stop(leave=leave)
        return {
            "stopping": True,
            "pid": os.getpid(),
            "client_id": daemon.settings.mqtt.client_id,
            "leave": daemon.leaving,
        }

    async def events(self, args: Args, conn: Connection, rid: RequestId) -> object:
        with self.daemon.events.subscribe() as events:
            await conn.send(ok_message(rid, {"stream": True}))
            async for event in events:
                await conn.send(event_message(rid, event))
        return _STREAMED

    # -------------------------------------------------------------- helpers

    def _targets(self, cmd: str, args: Args) -> list[str]:
        a = cast(TargetArgs, args)
        names = [t.cfg.name for t in self.daemon.triggers()]
        if a.get("all"):
            if "id" in a:
                raise ProtocolError("bad_args", f"{cmd}: give an id or all, not both")
            return names
        if "id" not in a:
            raise ProtocolError("bad_args", f"{cmd}: give an id or all: true")
        if a["id"] not in names:
            raise ProtocolError("not_found", f"no trigger or schedule {a['id']!r}")
        return [a["id"]]

    async def _history_record(self, run_id: str) -> JobRow | None:
        history = self.daemon.history
        return await history.get(run_id) if history is not None else None

    async def _check_inputs(
        self, pipeline: str, inputs: Mapping[str, object], overrides: Mapping[str, object]
    ) -> None:
        """Inputs must be inputs of the pipeline (building its DAG may import: a thread)."""
        if not inputs:
            return
        runner = self.daemon.project.runner
        prepared = await anyio.to_thread.run_sync(runner.prepare, pipeline, overrides)
        error = prepared.unknown_inputs_error(inputs)
        if error is not None:
            raise ProtocolError("invalid", str(error))


def _run_overrides(cmd: str, args: Mapping[str, object]) -> dict[str, object]:
    """The ``run`` argument, validated like a trigger's ``run:``, plus ``final_vars``/``config``.

    ``final_vars`` and ``config`` as top-level arguments win over the same keys in ``run``.
    """
    raw = args.get("run")
    try:
        overrides = validate_run_overrides(raw if isinstance(raw, dict) else {})
    except ValueError as exc:
        raise ProtocolError("invalid", f"{cmd}: {exc}") from None
    final_vars = args.get("final_vars")
    if final_vars is not None:
        if not isinstance(final_vars, list) or not all(isinstance(v, str) for v in final_vars):
            raise ProtocolError("bad_args", f"{cmd}: 'final_vars' must be an array of strings")
        overrides["final_vars"] = list(final_vars)
    config = args.get("config")
    if isinstance(config, dict):
        overrides["config"] = dict(config)
    return overrides


def _schedule_spec(a: ScheduleAddArgs) -> tuple[ScheduleKind, str]:
    """The one schedule kind given and its spec as a string (FlowerPower's dict forms too)."""
    given: list[ScheduleKind] = [k for k in ("cron", "interval", "date") if k in a]
    if len(given) != 1:
        raise ProtocolError("bad_args", "schedule_add: give exactly one of cron, interval, date")
    kind = given[0]
    try:
        if kind == "cron":
            cron = a["cron"]
            return kind, parse_cron(cron) if isinstance(cron, dict) else cron
        if kind == "interval":
            every = a["interval"]
            if isinstance(every, dict):
                return kind, f"{parse_interval(every).total_seconds():g}"
            return kind, str(every)
        return kind, a["date"]
    except ValueError as exc:
        raise ProtocolError("invalid", f"schedule_add: '{kind}': {exc}") from None


def _error(rid: RequestId, code: str, message: str, details: object = None) -> dict[str, object]:
    """An error answer whose message holds no URL password (a Redis error may quote one) and
    no pydantic "Value error, " prefix."""
    return error_message(rid, code, redact_url(clean_message(message)), details)


def _schedule_row(trig: TriggerStatus) -> TriggerRow:
    """A timer's row with the inputs it runs with and when it was added (dynamic ones)."""
    row = _trigger_row(trig)
    row["inputs"] = dict(trig.cfg.inputs)
    row["created_at"] = trig.created_at
    return row


def _trigger_row(trig: TriggerStatus) -> TriggerRow:
    cfg = trig.cfg
    return {
        "name": cfg.name,
        "type": cfg.type,
        "pipeline": cfg.pipeline,
        "origin": trig.origin,
        "spec": _spec_text(cfg),
        "enabled": cfg.enabled,
        "paused": trig.paused,
        "next_fire": None if trig.paused or trig.next_fire is None else trig.next_fire.isoformat(),
        "fired": trig.fired,
        "ok": trig.ok,
        "failed": trig.failed,
        "skipped": trig.skipped,
        "running": trig.running,
    }


async def _until_closed(conn: Connection, call: Awaitable[object]) -> object:
    """Await ``call`` unless the client closes its end first (then None); errors propagate."""
    outcome: list[tuple[bool, object]] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                outcome.append((True, await call))
            except Exception as exc:
                outcome.append((False, exc))
            tg.cancel_scope.cancel()

        async def watch() -> None:
            await conn.until_closed()
            tg.cancel_scope.cancel()

        tg.start_soon(run, name="control-call")
        tg.start_soon(watch, name="control-watch")
    if not outcome:
        if inspect.iscoroutine(call):
            call.close()
        return None
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, Exception)
        raise value
    return value


def _result_json(result: RunResult) -> orjson.Fragment:
    from ..project.encoding import encode_result

    return orjson.Fragment(encode_result(result, max_bytes=16 * 1024 * 1024))


def _spec_text(cfg: Trigger) -> str:
    if isinstance(cfg, MqttTrigger):
        return cfg.topic
    if isinstance(cfg, CronTrigger):
        return cfg.cron + (f" ({cfg.timezone})" if cfg.timezone else "")
    if isinstance(cfg, IntervalTrigger):
        return f"every {cfg.every}"
    if isinstance(cfg, DateTrigger):
        return f"at {cfg.at.isoformat()}"
    return cfg.path
