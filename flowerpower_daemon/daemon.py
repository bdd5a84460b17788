"""Wiring and lifecycle: one task group owns every background task.

``Daemon.serve`` starts the MQTT link, the taskiq broker, and one source
task per trigger (MQTT messages, timers, file watchers); sources hand
events to the dispatcher, which runs them through taskiq. The first
SIGTERM/SIGINT stops the sources, lets in-flight runs finish within
``shutdown_timeout`` and publish their results, then exits 0; a second
signal cancels at once. SIGHUP re-reads the project.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup

from . import __version__
from .dispatch import Dispatcher, Stats
from .errors import ConfigError, ConfigProblem, FlowerPowerError
from .project.api import FlowerPowerProject
from .project.models import RunRequest, RunResult
from .settings import (
    CronTrigger,
    DateTrigger,
    FileTrigger,
    IntervalTrigger,
    MqttTrigger,
    Settings,
    load_settings,
)
from .triggers.base import TriggerEvent

__all__ = ["Daemon", "check", "main"]

log = structlog.get_logger("flowerpower_daemon.daemon")


def schedule_triggers(settings: Settings, project: FlowerPowerProject) -> list[Any]:
    """Every pipeline's ``schedule:`` as a timer trigger (FlowerPower's ``schedule_all``)."""
    if not settings.schedule_all:
        return []
    out: list[Any] = []
    for name, cfg in sorted(project.pipelines.items()):
        sched = cfg.schedule
        if not sched.enabled or sched.kind is None:
            continue
        base = {"name": f"schedule:{name}", "pipeline": name}
        if sched.cron:
            out.append(CronTrigger(type="cron", cron=sched.cron, timezone=sched.timezone, **base))
        elif sched.interval:
            out.append(IntervalTrigger(type="interval", every=sched.interval, **base))
        elif sched.date:
            out.append(DateTrigger(type="date", at=sched.date, **base))
    return out


def check(settings: Settings) -> list[ConfigProblem]:
    """Validate the project and every trigger against its pipeline; return all problems."""
    shown = "config"
    try:
        project = FlowerPowerProject.load(settings.project, storage_options=settings.storage_options)
    except ConfigError as exc:
        return exc.problems
    except FlowerPowerError as exc:
        return [ConfigProblem(shown, "project", str(exc))]
    problems: list[ConfigProblem] = []
    for i, trig in enumerate(settings.triggers):
        key = f"triggers[{i}]"
        if trig.pipeline not in project.pipelines:
            known = ", ".join(sorted(project.pipelines)) or "none"
            problems.append(
                ConfigProblem(shown, f"{key}.pipeline", f"unknown pipeline {trig.pipeline!r} (pipelines: {known})")
            )
            continue
        try:
            prepared = project.runner.prepare(trig.pipeline, trig.run)
        except FlowerPowerError as exc:
            problems.append(ConfigProblem(shown, f"{key}.pipeline", str(exc)))
            continue
        known_inputs = set(prepared.dag.inputs)
        # Topic fields need not be inputs: they may only feed result-topic templates.
        names = dict.fromkeys(trig.inputs, f"{key}.inputs")
        if isinstance(trig, FileTrigger):
            if not os.path.isdir(trig.path):
                problems.append(ConfigProblem(shown, f"{key}.path", f"directory {trig.path!r} does not exist"))
        for name, where in names.items():
            if name not in known_inputs:
                problems.append(
                    ConfigProblem(
                        shown,
                        where,
                        f"{name!r} is not an input of pipeline {trig.pipeline!r} "
                        f"(inputs: {', '.join(sorted(known_inputs)) or 'none'})",
                    )
                )
    return problems


class Daemon:
    """Wires sources, dispatch, queue and sinks inside one task group."""

    def __init__(self, settings: Settings, project: FlowerPowerProject | None = None) -> None:
        self.settings = settings
        self.project = project or FlowerPowerProject.load(
            settings.project, storage_options=settings.storage_options
        )
        self.triggers = [t for t in settings.triggers if t.enabled] + schedule_triggers(
            settings, self.project
        )
        self.stats = Stats()
        self._stopping = anyio.Event()
        self.dispatcher: Dispatcher | None = None
        self.link: Any = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown (as SIGTERM)."""
        self._stopping.set()

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`request_stop` or a signal; returns after a graceful shutdown."""
        from .mqtt import MqttLink, status_payload_factory
        from .queue import RunExecutor, create_broker, register_run_task
        from .results import MqttResultSink

        s = self.settings
        async with AsyncExitStack() as stack:
            mqtt_settings = s.mqtt
            if s.mqtt.url == "embedded":
                from .embedded import embedded_broker

                mqtt_settings = await stack.enter_async_context(embedded_broker(s.mqtt))
            mqtt_triggers = [t for t in self.triggers if isinstance(t, MqttTrigger)]
            subscriptions = [
                (_subscription(t), t.qos) for t in mqtt_triggers
            ]
            link = MqttLink(
                mqtt_settings,
                subscriptions=list(dict.fromkeys(subscriptions)),
                receive_maximum=s.max_concurrent_runs,
                status_payload=status_payload_factory(
                    __version__, sorted(self.project.pipelines), mqtt_settings.client_id
                ),
            )
            self.link = link
            sink = MqttResultSink(link, qos=s.mqtt.result_qos, max_bytes=s.mqtt.max_result_bytes)
            broker = create_broker(s.queue)
            executor = RunExecutor(self.project.runner, sink, on_result=self._on_result)
            task = register_run_task(broker, executor)
            await broker.startup()
            stack.push_async_callback(_shielded, broker.shutdown)
            if not s.queue.is_redis:
                await anyio.to_thread.run_sync(self._warm_up)

            async def kiq(data: dict[str, Any]) -> Any:
                return await task.kiq(data)

            self.dispatcher = Dispatcher(
                s, self.triggers, kiq=kiq, sink=sink, remote=s.queue.is_redis, stats=self.stats
            )
            async with anyio.create_task_group() as root:
                root.start_soon(self._signals, root, name="signals")
                await root.start(link.run, name="mqtt-link")
                async with anyio.create_task_group() as runs:
                    async with anyio.create_task_group() as sources:
                        if mqtt_triggers:
                            sources.start_soon(self._mqtt_source, runs, name="source:mqtt")
                        for trig in self.triggers:
                            if isinstance(trig, CronTrigger | IntervalTrigger | DateTrigger):
                                sources.start_soon(self._timer_source, trig, runs, name=f"source:{trig.name}")
                            elif isinstance(trig, FileTrigger):
                                sources.start_soon(self._file_source, trig, runs, name=f"source:{trig.name}")
                        log.info(
                            "daemon_ready",
                            version=__version__,
                            pipelines=sorted(self.project.pipelines),
                            triggers=[t.name for t in self.triggers],
                            queue=s.queue.broker,
                            mqtt=f"{mqtt_settings.host}:{mqtt_settings.port}",
                        )
                        if ready is not None:
                            ready()
                        await self._stopping.wait()
                        log.info("daemon_stopping", in_flight=self.stats.in_flight)
                        sources.cancel_scope.cancel()
                    runs.cancel_scope.deadline = anyio.current_time() + s.shutdown_timeout
                await link.flush(timeout=min(5.0, s.shutdown_timeout))
                link.stop()
                root.cancel_scope.cancel()
        log.info("daemon_stopped", runs_ok=self.stats.runs_ok, runs_failed=self.stats.runs_failed)

    def _warm_up(self) -> None:
        """Import modules and build drivers for every triggered pipeline before taking events."""
        for trig in self.triggers:
            try:
                self.project.runner.prepare(trig.pipeline, trig.run)
            except FlowerPowerError as exc:
                log.error("pipeline_not_ready", trigger=trig.name, pipeline=trig.pipeline, error=str(exc))

    async def _on_result(self, request: RunRequest, result: RunResult) -> None:
        if self.dispatcher is not None:
            self.dispatcher.record(request, result)

    async def _signals(self, root: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload()
                    continue
                if self._stopping.is_set():
                    log.warning("second_signal_cancelling_now")
                    root.cancel_scope.cancel()
                    return
                log.info("signal_received", signal=signal.Signals(signum).name)
                self._stopping.set()

    def _reload(self) -> None:
        try:
            self.project.reload()
        except FlowerPowerError as exc:
            log.error("reload_failed_keeping_old_config", error=str(exc))
        else:
            log.info("reloaded", pipelines=sorted(self.project.pipelines))

    async def _mqtt_source(self, runs: TaskGroup) -> None:
        assert self.dispatcher is not None
        dispatcher = self.dispatcher
        async for msg in self.link.messages():
            self.stats.messages_in += 1
            matches = dispatcher.mqtt_matches(msg.topic)
            if not matches:
                self.stats.unmatched += 1
                log.warning("mqtt_unmatched_topic", topic=msg.topic)
                await msg.ack()
                continue
            ack = _countdown(len(matches), msg.ack)
            for state, fields in matches:
                event = TriggerEvent(
                    trigger=state.cfg.name,
                    kind="mqtt",
                    payload=msg.payload,
                    inputs=fields,
                    meta={
                        "topic": msg.topic,
                        "fields": fields,
                        "qos": msg.qos,
                        "response_topic": msg.response_topic,
                        "correlation_data": msg.correlation_data,
                    },
                    ack=ack,
                )
                await dispatcher.submit(event, runs)

    async def _timer_source(self, trig: Any, runs: TaskGroup) -> None:
        from .triggers.timers import TimerSpec, timer_events

        assert self.dispatcher is not None
        if isinstance(trig, CronTrigger):
            spec = TimerSpec(trig.name, "cron", cron=trig.cron, timezone=trig.timezone,
                             jitter=trig.jitter, misfire_grace=trig.misfire_grace)
        elif isinstance(trig, IntervalTrigger):
            spec = TimerSpec(trig.name, "interval", every=trig.every, start_at=trig.start_at,
                             jitter=trig.jitter)
        else:
            spec = TimerSpec(trig.name, "date", date=trig.at, misfire_grace=trig.misfire_grace)
        async for event in timer_events(spec):
            await self.dispatcher.submit(event, runs)

    async def _file_source(self, trig: FileTrigger, runs: TaskGroup) -> None:
        from .triggers.files import file_events

        assert self.dispatcher is not None
        async for event in file_events(
            trig.name,
            trig.path,
            patterns=trig.patterns,
            recursive=trig.recursive,
            events=trig.events,
            debounce_ms=int(trig.debounce * 1000),
        ):
            await self.dispatcher.submit(event, runs)


def _subscription(trig: MqttTrigger) -> str:
    from .triggers.mqtt import compile_topic

    topic = compile_topic(trig.topic).filter
    return f"$share/{trig.shared_group}/{topic}" if trig.shared_group else topic


def _countdown(n: int, ack: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """An ack that fires the real one after ``n`` calls (one message, several triggers)."""
    remaining = [n]

    async def countdown() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            await ack()

    return countdown


async def _shielded(fn: Callable[[], Awaitable[Any]]) -> None:
    with anyio.move_on_after(5, shield=True):
        await fn()


async def run_worker(settings: Settings) -> None:
    """``flowerpower-daemon worker``: execute runs from the Redis stream and publish results."""
    from taskiq.acks import AcknowledgeType
    from taskiq.api import run_receiver_task

    from .mqtt import MqttLink
    from .queue import RunExecutor, create_broker, register_run_task
    from .results import MqttResultSink

    if not settings.queue.is_redis:
        raise ConfigError([ConfigProblem("config", "queue.broker",
                                         "a worker needs queue.broker: redis://...; 'memory' runs in the daemon")])
    project = FlowerPowerProject.load(settings.project, storage_options=settings.storage_options)
    client_id = f"{settings.mqtt.client_id}-worker-{socket.gethostname()}-{os.getpid()}"
    link = MqttLink(settings.mqtt, client_id=client_id)
    sink = MqttResultSink(link, qos=settings.mqtt.result_qos, max_bytes=settings.mqtt.max_result_bytes)
    broker = create_broker(settings.queue, worker=True)
    broker.is_worker_process = True
    register_run_task(broker, RunExecutor(project.runner, sink))
    await broker.startup()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(link.run, name="mqtt-link")

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        log.info("worker_stopping")
                        await link.flush(5)
                        link.stop()
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal, name="signals")
            log.info("worker_ready", queue=settings.queue.broker, pipelines=sorted(project.pipelines))
            await run_receiver_task(
                broker,
                max_async_tasks=settings.queue.worker_concurrency,
                ack_time=AcknowledgeType.WHEN_SAVED,
                run_startup=False,
            )
    finally:
        await _shielded(broker.shutdown)


def main(command: str, config: str | None, log_level: str | None) -> int:
    """``run``, ``check`` and ``worker``; maps errors to exit codes (2 = bad config)."""
    from .logs import configure_logging

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_level or settings.log_level, settings.log_format)
    if command == "check":
        problems = check(settings)
        if problems:
            print(f"{len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 2
        print(f"ok: {len(settings.triggers)} trigger(s), project {settings.project}")
        return 0
    try:
        if command == "worker":
            anyio.run(run_worker, settings)
        else:
            anyio.run(Daemon(settings).serve)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FlowerPowerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
