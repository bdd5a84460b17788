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

import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread
import orjson
import structlog

from .. import __version__
from ..errors import ConfigError, FlowerPowerError, PipelineNotFoundError
from ..project.models import RunResult, utcnow
from ..settings import CronTrigger, DateTrigger, FileTrigger, IntervalTrigger, MqttTrigger
from ..state.history import FINISHED_STATES
from .protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    Request,
    error_message,
    event_message,
    ok_message,
)
from .server import Connection

if TYPE_CHECKING:
    from ..service.daemon import Daemon

__all__ = ["Commands"]

log = structlog.get_logger("flowerpower_daemon.control")

ACTIVE_STATES = ("scheduled", "queued", "running")
MAX_LIMIT = 1000

Handler = Callable[[Mapping[str, Any], Connection, Any], Awaitable[Any]]
_STREAMED = object()
#: Commands that make sense before the daemon is ready.
_ALWAYS = frozenset({"ping", "status", "stop", "events"})


class Commands:
    """The handlers of every command in :data:`~.protocol.COMMANDS`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._handlers: dict[str, Handler] = {
            "ping": self.ping,
            "status": self.status,
            "pipelines": self.pipelines,
            "triggers": self.triggers,
            "run": self.run,
            "jobs": self.jobs,
            "job": self.job,
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
        try:
            if not self.daemon.ready and request.cmd not in _ALWAYS:
                raise ProtocolError("unavailable", "the daemon is still starting; try again")
            if request.cmd == "events" or (request.cmd == "run" and request.args.get("wait")):
                result = await _until_closed(conn, handler(request.args, conn, request.id))
                if result is None:
                    return  # the client left
            else:
                result = await handler(request.args, conn, request.id)
            if result is not _STREAMED:
                await conn.send(ok_message(request.id, result))
        except ProtocolError as exc:
            await conn.send(error_message(request.id, exc.code, exc.message, exc.details))
        except ConfigError as exc:
            await conn.send(
                error_message(request.id, "invalid", str(exc), [p.as_dict() for p in exc.problems])
            )
        except (PipelineNotFoundError, LookupError) as exc:
            await conn.send(error_message(request.id, "not_found", str(exc)))
        except (FlowerPowerError, ValueError) as exc:
            await conn.send(error_message(request.id, "invalid", str(exc)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError):
            raise
        except Exception as exc:
            log.exception("control_command_failed", cmd=request.cmd)
            await conn.send(error_message(request.id, "internal", f"{type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ info

    async def ping(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        return {"pong": True, "version": __version__, "protocol": PROTOCOL_VERSION}

    async def status(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        s = d.settings
        link = d.link
        stats = d.stats
        history = d.history
        return {
            "version": __version__,
            "pid": os.getpid(),
            "state": "stopping" if d.stopping else ("running" if d.ready else "starting"),
            "started_at": d.started_at.isoformat(),
            "uptime_s": round(time.monotonic() - d.started_monotonic, 3),
            "config": d.config_path,
            "project": s.project,
            "state_dir": str(s.state_path),
            "socket": str(d.control.path) if d.control else None,
            "mqtt": {
                "broker": f"{s.mqtt.host}:{s.mqtt.port}"
                if s.mqtt.url != "embedded"
                else "embedded",
                "connected": bool(link and link.connected),
                "connects": getattr(link, "connects", 0),
                "outbox": getattr(d.publisher, "outbox_size", 0),
                "published": getattr(d.publisher, "published", 0),
                "held": getattr(link, "held", 0),
                "intake_pauses": getattr(link, "pauses", 0),
            },
            "queue": {
                "backend": "redis" if s.queue.is_redis else "memory",
                "broker": _redact(s.queue.broker),
            },
            "counters": {
                "messages_in": stats.messages_in,
                "events": stats.events,
                "runs_ok": stats.runs_ok,
                "runs_failed": stats.runs_failed,
                "bad_input": stats.bad_input,
                "skipped": stats.skipped,
                "duplicates": stats.duplicates,
                "coalesced": stats.coalesced,
                "unmatched": stats.unmatched,
                "results_out": getattr(d.sink, "results_out", 0),
            },
            "in_flight": stats.in_flight,
            "active": [j.summary() for j in d.jobs.active.values()],
            "pipelines": len(d.project.pipelines),
            "triggers": len(d.dispatcher.triggers) if d.dispatcher else len(d.triggers),
            "paused": sorted(d.schedules.paused),
            "history": {
                "recorded": history.recorded if history else 0,
                "location": history.location if history else None,
            },
            "control": {
                "clients": d.control.clients if d.control else 0,
                "requests": d.control.requests if d.control else 0,
            },
        }

    async def pipelines(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        by_pipeline: dict[str, list[str]] = {}
        for state in self._trigger_states():
            by_pipeline.setdefault(state.cfg.pipeline, []).append(state.cfg.name)
        out = []
        for name, cfg in sorted(d.project.pipelines.items()):
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

    async def triggers(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        return [self._trigger_row(state) for state in self._trigger_states()]

    async def schedules(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        rows = []
        for state in self._trigger_states():
            if isinstance(state.cfg, CronTrigger | IntervalTrigger | DateTrigger):
                row = self._trigger_row(state)
                dynamic = self.daemon.schedules.schedules.get(state.cfg.name)
                row["inputs"] = dict(state.cfg.inputs)
                row["created_at"] = dynamic.created_at if dynamic else None
                rows.append(row)
        return rows

    # ------------------------------------------------------------------ runs

    async def run(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        pipeline = args["pipeline"]
        if pipeline not in d.project.pipelines:
            raise PipelineNotFoundError(pipeline, d.project.pipelines)
        final_vars = args.get("final_vars")
        if final_vars is not None and not all(isinstance(v, str) for v in final_vars):
            raise ProtocolError("bad_args", "run: 'final_vars' must be an array of strings")
        if "run_in" in args and "run_at" in args:
            raise ProtocolError("bad_args", "run: give 'run_in' or 'run_at', not both")
        run_at = None
        if "run_in" in args:
            if args["run_in"] < 0:
                raise ProtocolError("invalid", "run: 'run_in' must be >= 0 seconds")
            run_at = utcnow() + timedelta(seconds=args["run_in"])
        elif "run_at" in args:
            from ..project.schedule import parse_date

            run_at = parse_date(args["run_at"])
        wait = bool(args.get("wait"))
        if wait and d.settings.queue.is_redis:
            raise ProtocolError(
                "conflict",
                "run --wait needs queue.broker: memory (with Redis, a worker runs it; "
                "follow it with 'flowerpowerctl job ID')",
            )
        overrides: dict[str, Any] = {}
        if final_vars is not None:
            overrides["final_vars"] = list(final_vars)
        if "config" in args:
            overrides["config"] = dict(args["config"])
        request = d.manual_request(pipeline, dict(args.get("inputs") or {}), overrides)
        job = d.submit_run(request, run_at=run_at)
        if not wait:
            return {
                "run_id": request.run_id,
                "state": job.state,
                "run_at": run_at.isoformat() if run_at else None,
            }
        result = await d.jobs.wait(request.run_id)
        if result is None:
            record = await self._history_record(request.run_id)
            if record is None:
                raise ProtocolError("internal", f"run {request.run_id} ended without a result")
            return {"run_id": request.run_id, "state": record["state"], "result": record["result"]}
        return {"run_id": request.run_id, "state": result.status, "result": _result_json(result)}

    async def jobs(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        limit = args.get("limit", 20)
        if not 1 <= limit <= MAX_LIMIT:
            raise ProtocolError("invalid", f"jobs: 'limit' must be 1..{MAX_LIMIT}")
        state = args.get("state")
        known = (*ACTIVE_STATES, *FINISHED_STATES)
        if state is not None and state not in known:
            raise ProtocolError(
                "invalid", f"jobs: unknown state {state!r} (states: {', '.join(known)})"
            )
        pipeline = args.get("pipeline")
        rows = [
            j.summary()
            for j in d.jobs.active.values()
            if (pipeline is None or j.request.pipeline == pipeline)
            and (state is None or j.state == state)
        ]
        rows.sort(key=lambda r: r["queued_at"], reverse=True)
        rows = rows[:limit]
        if d.history is not None and len(rows) < limit and state not in ACTIVE_STATES:
            rows += await d.history.recent(
                pipeline=pipeline, states=(state,) if state else (), limit=limit - len(rows)
            )
        return rows

    async def job(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        run_id = args["id"]
        active = self.daemon.jobs.active.get(run_id)
        if active is not None:
            return {**active.summary(), "request": active.request.to_dict()}
        record = await self._history_record(run_id)
        if record is None:
            raise ProtocolError("not_found", f"no job {run_id!r} (active or in the history)")
        return record

    async def cancel(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        run_id = args["id"]
        if not d.jobs.cancel(run_id):
            record = await self._history_record(run_id)
            if record is not None:
                raise ProtocolError("conflict", f"job {run_id} already finished: {record['state']}")
            raise ProtocolError("not_found", f"no active job {run_id!r}")
        with anyio.move_on_after(5):
            await d.jobs.wait(run_id)
        record = await self._history_record(run_id)
        return {"run_id": run_id, "state": record["state"] if record else "cancelling"}

    # ------------------------------------------------------------- schedules

    async def schedule_add(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        from ..state.schedules import Schedule

        d = self.daemon
        kinds = [k for k in ("cron", "interval", "date") if k in args]
        if len(kinds) != 1:
            raise ProtocolError(
                "bad_args", "schedule_add: give exactly one of cron, interval, date"
            )
        kind: Any = kinds[0]
        pipeline = args["pipeline"]
        if pipeline not in d.project.pipelines:
            raise PipelineNotFoundError(pipeline, d.project.pipelines)
        sid = args.get("id") or f"{pipeline}-{uuid.uuid4().hex[:8]}"
        exists = d.dispatcher is not None and sid in d.dispatcher.triggers
        if sid in d.schedules.schedules:
            if not args.get("overwrite"):
                raise ProtocolError(
                    "conflict", f"schedule {sid!r} exists; use --overwrite to replace it"
                )
        elif exists:
            raise ProtocolError(
                "conflict", f"{sid!r} is a trigger from the config file or project; pick another id"
            )
        inputs = dict(args.get("inputs") or {})
        schedule = Schedule.new(
            sid, pipeline, kind, str(args[kind]), timezone=args.get("timezone"), inputs=inputs
        )
        trigger = schedule.to_trigger()  # ValueError -> invalid
        await self._check_inputs(pipeline, inputs)
        await d.add_schedule(schedule, trigger)
        state = d.dispatcher.triggers[sid] if d.dispatcher else None
        return self._trigger_row(state) if state else schedule.to_dict()

    async def schedule_rm(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        d = self.daemon
        sid = args["id"]
        if sid not in d.schedules.schedules:
            if d.dispatcher is not None and sid in d.dispatcher.triggers:
                raise ProtocolError(
                    "conflict", f"{sid!r} comes from the config file or project: edit it and reload"
                )
            raise ProtocolError("not_found", f"no dynamic schedule {sid!r}")
        await d.remove_schedule(sid)
        return {"removed": sid}

    async def pause(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        return {"paused": await self.daemon.set_paused(self._targets("pause", args), True)}

    async def resume(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        return {"resumed": await self.daemon.set_paused(self._targets("resume", args), False)}

    # -------------------------------------------------------------- lifecycle

    async def reload(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        try:
            return await self.daemon.reload()
        except ConfigError as exc:
            raise ProtocolError(
                "reload_failed",
                f"kept the running config: {len(exc.problems)} problem(s) in the new one",
                details=[p.as_dict() for p in exc.problems],
            ) from None

    async def stop(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        self.daemon.request_stop()
        return {"stopping": True, "pid": os.getpid()}

    async def events(self, args: Mapping[str, Any], conn: Connection, rid: Any) -> Any:
        with self.daemon.events.subscribe() as events:
            await conn.send(ok_message(rid, {"stream": True}))
            async for event in events:
                await conn.send(event_message(rid, event))
        return _STREAMED

    # -------------------------------------------------------------- helpers

    def _trigger_states(self) -> list[Any]:
        d = self.daemon
        return list(d.dispatcher.triggers.values()) if d.dispatcher else []

    def _trigger_row(self, state: Any) -> dict[str, Any]:
        from ..sources.timers import next_fire

        d = self.daemon
        cfg = state.cfg
        spec = d.timer_specs.get(cfg.name)
        nxt = next_fire(spec, utcnow()) if spec is not None else None
        return {
            "name": cfg.name,
            "type": cfg.type,
            "pipeline": cfg.pipeline,
            "origin": d.trigger_origin(cfg.name),
            "spec": _spec_text(cfg),
            "enabled": cfg.enabled,
            "paused": state.paused,
            "next_fire": None if state.paused or nxt is None else nxt.isoformat(),
            "fired": state.fired,
            "ok": state.ok,
            "failed": state.failed,
            "skipped": state.skipped,
            "running": len(state.running),
        }

    def _targets(self, cmd: str, args: Mapping[str, Any]) -> list[str]:
        names = [s.cfg.name for s in self._trigger_states()]
        if args.get("all"):
            if "id" in args:
                raise ProtocolError("bad_args", f"{cmd}: give an id or all, not both")
            return names
        if "id" not in args:
            raise ProtocolError("bad_args", f"{cmd}: give an id or all: true")
        if args["id"] not in names:
            raise ProtocolError("not_found", f"no trigger or schedule {args['id']!r}")
        return [args["id"]]

    async def _history_record(self, run_id: str) -> dict[str, Any] | None:
        history = self.daemon.history
        return await history.get(run_id) if history is not None else None

    async def _check_inputs(self, pipeline: str, inputs: Mapping[str, Any]) -> None:
        """Inputs must be inputs of the pipeline's DAG (building it may import: a thread)."""
        if not inputs:
            return
        runner = self.daemon.project.runner
        prepared = await anyio.to_thread.run_sync(runner.prepare, pipeline)
        unknown = sorted(set(inputs) - set(prepared.dag.inputs))
        if unknown:
            raise ProtocolError(
                "invalid",
                f"{', '.join(map(repr, unknown))} not input(s) of pipeline {pipeline!r} "
                f"(inputs: {', '.join(sorted(prepared.dag.inputs)) or 'none'})",
            )


async def _until_closed(conn: Connection, call: Awaitable[Any]) -> Any:
    """Await ``call`` unless the client closes its end first (then None); errors propagate."""
    outcome: list[tuple[bool, Any]] = []
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
        raise value
    return value


def _result_json(result: RunResult) -> Any:
    from ..project.encoding import encode_result

    return orjson.Fragment(encode_result(result, max_bytes=16 * 1024 * 1024))


def _spec_text(cfg: Any) -> str:
    if isinstance(cfg, MqttTrigger):
        return cfg.topic
    if isinstance(cfg, CronTrigger):
        return cfg.cron + (f" ({cfg.timezone})" if cfg.timezone else "")
    if isinstance(cfg, IntervalTrigger):
        return f"every {cfg.every}"
    if isinstance(cfg, DateTrigger):
        return f"at {cfg.at.isoformat()}"
    if isinstance(cfg, FileTrigger):
        return cfg.path
    return ""


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
