"""Wiring and lifecycle: one task group owns every background task.

``Daemon.serve`` starts the MQTT link, the taskiq broker, and one source
task per trigger (MQTT messages, timers, file watchers); sources hand
events to the dispatcher, which runs them through taskiq. The first
SIGTERM/SIGINT stops the sources, lets in-flight runs finish within
``shutdown_timeout`` and publish their results, then exits 0; a second
signal cancels at once. SIGHUP (or ``flowerpowerctl reload``) validates the
new config and project and applies the difference, or keeps the old one.

The control socket is claimed first (a second daemon on the same socket
refuses before it touches MQTT), systemd hears ``READY=1`` once MQTT
subscriptions are active and timers armed, and every run goes through the
job tracker (history, events, ``run --wait``, ``cancel``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup, TaskStatus

from .. import __version__
from ..control.events import EventBus
from ..dispatch.dispatcher import Dispatcher, Stats
from ..errors import ConfigError, FlowerPowerError
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult, TriggerInfo, utcnow
from ..settings import (
    CronTrigger,
    DateTrigger,
    FileTrigger,
    IntervalTrigger,
    MqttTrigger,
    Settings,
)
from ..sources.base import TriggerEvent
from ..state.history import history_for
from ..state.schedules import Schedule, ScheduleStore
from .check import check, configured_triggers
from .jobs import ActiveJob, JobTracker
from .lifecycle import freeze_heap, shielded
from .systemd import Notifier

__all__ = ["Daemon", "check"]

log = structlog.get_logger("flowerpower_daemon.daemon")


class Daemon:
    """Wires sources, dispatch, queue and sinks inside one task group."""

    def __init__(
        self,
        settings: Settings,
        project: FlowerPowerProject | None = None,
        *,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.project = project or FlowerPowerProject.load(
            settings.project, storage_options=settings.storage_options
        )
        self.schedules = ScheduleStore.load(settings.state_path)
        self.triggers = _merge(
            configured_triggers(settings, self.project), self.schedules.triggers()
        )
        self.stats = Stats()
        self._stopping = anyio.Event()
        self.dispatcher: Dispatcher | None = None
        self.link: Any = None
        self.publisher: Any = None
        self.sink: Any = None
        self.started_at: datetime = utcnow()
        self.started_monotonic = time.monotonic()
        self.events = EventBus()
        self.history = history_for(settings)
        self.jobs = JobTracker(self.history, self.events, remote=settings.queue.is_redis)
        self.notifier = Notifier()
        self.control: Any = None
        self.timer_specs: dict[str, Any] = {}
        self.timer_state: Any = None
        self._source_scopes: dict[str, anyio.CancelScope] = {}
        self._sources: TaskGroup | None = None
        self._runs: TaskGroup | None = None
        self._executor: Any = None
        self._reload_lock = anyio.Lock()
        self._ready = False

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def ready(self) -> bool:
        """True once MQTT subscriptions are active and every source is armed."""
        return self._ready

    def request_stop(self) -> None:
        """Begin a graceful shutdown (as SIGTERM)."""
        self._stopping.set()

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`request_stop` or a signal; returns after a graceful shutdown."""
        from taskiq import InMemoryBroker

        from ..control.commands import Commands
        from ..control.server import ControlServer, socket_path
        from ..mqtt.link import MqttLink, status_payload_factory
        from ..mqtt.outbox import Outbox
        from ..mqtt.sinks import MqttResultSink
        from ..queue.broker import (
            InProcessFormatter,
            InProcessRequest,
            RunExecutor,
            create_broker,
            register_run_task,
        )
        from ..queue.threads import ElasticThreadPool

        s = self.settings
        async with AsyncExitStack() as stack:
            # First: a second daemon on the same socket refuses before it touches MQTT.
            self.control = ControlServer(
                s.control, socket_path(s.control, s.state_path), Commands(self).handle
            )
            stack.enter_context(self.control.claim())
            stack.callback(self.notifier.close)
            await stack.enter_async_context(self.history)
            mqtt_settings = s.mqtt
            if s.mqtt.url == "embedded":
                from ..mqtt.embedded import embedded_broker

                mqtt_settings = await stack.enter_async_context(embedded_broker(s.mqtt))
            mqtt_triggers = [t for t in self.triggers if isinstance(t, MqttTrigger)]
            subscriptions = [(_subscription(t), t.qos) for t in mqtt_triggers]
            # Results waiting for the broker survive a restart (on disk, in the state dir).
            outbox = await stack.enter_async_context(
                Outbox(s.state_path / "outbox.sqlite3", max_size=s.mqtt.outbox_size)
            )
            link = MqttLink(
                mqtt_settings,
                subscriptions=list(dict.fromkeys(subscriptions)),
                receive_maximum=s.max_concurrent_runs,
                status_payload=status_payload_factory(
                    __version__, sorted(self.project.pipelines), mqtt_settings.client_id
                ),
                # Past Receive Maximum (a broker may send more): every handler slot
                # filled plus one round of runs waiting, then the socket is not read.
                max_held=5 * s.max_concurrent_runs,
            )
            # Results go out on a connection of their own: the receiving one may pause its
            # socket, and must not hold back the PUBACKs the results' publishes wait for.
            publisher = MqttLink(
                mqtt_settings,
                client_id=f"{mqtt_settings.client_id}-results",
                outbox=outbox,
                companion=link,  # a broker outage is logged once, by `link`
            )
            self.link, self.publisher = link, publisher
            sink = MqttResultSink(
                publisher,
                qos=s.mqtt.result_qos,
                max_bytes=s.mqtt.max_result_bytes,
                result_store=s.mqtt.result_store,
            )
            self.sink = self.jobs.sink = sink
            broker = create_broker(s.queue)
            if isinstance(broker, InMemoryBroker):
                # Sync pipelines run in a pool that adds threads only while runs are stuck
                # (see threads.py): quick runs on one thread do not fight over the GIL.
                pool = ElasticThreadPool(s.max_concurrent_runs)
                stack.callback(pool.shutdown, wait=False)
                self.project.runner.executor = pool
            dedup = None
            if any(t.dedup_key for t in self.triggers):
                from ..state.dedup import dedup_store_for

                # SQLite in the state dir; with Redis the workers claim keys as they start
                # runs, and this daemon answers duplicates of finished runs (see dedup.py).
                dedup = await stack.enter_async_context(dedup_store_for(s))
            from ..state.timerstate import timer_state_for

            self.timer_state = await stack.enter_async_context(timer_state_for(s))
            executor = RunExecutor(
                self.project.runner, sink, on_result=self._on_result, dedup=dedup
            )
            self._executor = executor
            task = register_run_task(broker, executor)
            await broker.startup()
            stack.push_async_callback(shielded, broker.shutdown)
            if not s.queue.is_redis:
                await anyio.to_thread.run_sync(self._warm_up)

            formatter = broker.formatter
            in_process = formatter if isinstance(formatter, InProcessFormatter) else None

            async def kiq(request: RunRequest) -> Any:
                # taskiq's task id is the run id: one id in logs, history and Redis
                # (and no uuid4, a getrandom system call, per run).
                kicker = task.kicker().with_task_id(request.run_id)
                arg = request.to_dict() if in_process is None else InProcessRequest(request)
                try:
                    return await self.jobs.run(request, partial(kicker.kiq, arg))
                finally:
                    if in_process is not None:
                        in_process.forget(request.run_id)  # a kick that failed left it held

            hooks = await anyio.to_thread.run_sync(self._config_hooks)
            self.dispatcher = Dispatcher(
                s,
                self.triggers,
                kiq=kiq,
                sink=sink,
                remote=s.queue.is_redis,
                stats=self.stats,
                config_hooks=hooks,
                dedup=dedup,
            )
            async with anyio.create_task_group() as root:
                root.start_soon(self._signals, root, name="signals")
                await root.start(self.control.serve, name="control")
                await root.start(self.history.run, name="history")
                root.start_soon(self.notifier.watchdog, self.status_line, name="watchdog")
                await root.start(publisher.run, name="mqtt-results")
                await root.start(link.run, name="mqtt-link")
                async with anyio.create_task_group() as runs:
                    async with anyio.create_task_group() as sources:
                        self._sources, self._runs = sources, runs
                        for name in self.schedules.paused & set(self.dispatcher.triggers):
                            self.dispatcher.triggers[name].paused = True
                        # Always consumed: reload and `schedule add` may add MQTT triggers later.
                        sources.start_soon(self._mqtt_source, runs, name="source:mqtt")
                        for trig in self.triggers:
                            await self._start_source(trig)
                        freeze_heap()
                        # The retained status says `online` only now: subscribed, timers armed.
                        await link.announce_online()
                        log.info(
                            "daemon_ready",
                            version=__version__,
                            pipelines=sorted(self.project.pipelines),
                            triggers=[t.name for t in self.triggers],
                            queue=s.queue.broker,
                            mqtt=f"{mqtt_settings.host}:{mqtt_settings.port}",
                        )
                        self._ready = True
                        self.notifier.ready(self.status_line())
                        if ready is not None:
                            ready()
                        await self._stopping.wait()
                        log.info("daemon_stopping", in_flight=self.stats.in_flight)
                        self.notifier.stopping(self.status_line())
                        self.events.publish("stopping", in_flight=self.stats.in_flight)
                        sources.cancel_scope.cancel()
                        self.jobs.drop_scheduled()
                    runs.cancel_scope.deadline = anyio.current_time() + s.shutdown_timeout
                with anyio.move_on_after(min(5.0, s.shutdown_timeout)):
                    await publisher.flush()
                link.stop()
                publisher.stop()
                with anyio.move_on_after(10):
                    await link.wait_closed()
                    await publisher.wait_closed()
                root.cancel_scope.cancel()
        log.info("daemon_stopped", runs_ok=self.stats.runs_ok, runs_failed=self.stats.runs_failed)

    def _config_hooks(self) -> dict[str, Any]:
        """Each MQTT-triggered pipeline's ``mqtt_build_config`` hook (blocking import)."""
        from ..project.hooks import load_mqtt_build_config

        hooks: dict[str, Any] = {}
        for trig in self.triggers:
            if isinstance(trig, MqttTrigger) and trig.pipeline not in hooks:
                try:
                    hook = load_mqtt_build_config(self.project.files, trig.pipeline)
                except FlowerPowerError as exc:
                    log.error("hook_not_loaded", pipeline=trig.pipeline, error=str(exc))
                    continue
                if hook is not None:
                    hooks[trig.pipeline] = hook
        return hooks

    def _warm_up(self) -> None:
        """Import modules and build drivers for every triggered pipeline before taking events."""
        for trig in self.triggers:
            try:
                self.project.runner.prepare(trig.pipeline, trig.run)
            except FlowerPowerError as exc:
                log.error(
                    "pipeline_not_ready", trigger=trig.name, pipeline=trig.pipeline, error=str(exc)
                )

    async def _on_result(self, request: RunRequest, result: RunResult) -> None:
        if self.dispatcher is not None:
            self.dispatcher.record(request, result)
        await self.jobs.finished(request, result)

    async def _signals(self, root: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    root.start_soon(self._reload_logged, name="reload")
                    continue
                if self._stopping.is_set():
                    log.warning("second_signal_cancelling_now")
                    root.cancel_scope.cancel()
                    return
                log.info("signal_received", signal=signal.Signals(signum).name)
                self._stopping.set()

    async def _reload_logged(self) -> None:
        """SIGHUP: reload, logging the outcome (the ctl command gets it as its answer)."""
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload_failed_keeping_old_config", problems=[str(p) for p in exc.problems])
        except Exception:
            log.exception("reload_crashed_keeping_old_config")

    async def reload(self) -> dict[str, Any]:
        """Validate the new config and project, then apply the difference; else raise ConfigError.

        In-flight runs keep the runner they started with; triggers that did
        not change keep their state (counters, pause, running runs).
        """
        from . import reload as reloading

        async with self._reload_lock:
            self.notifier.reloading()
            self.events.publish("reloading")
            try:
                try:
                    new = await anyio.to_thread.run_sync(
                        lambda: reloading.prepare(
                            self.config_path,
                            list(self.schedules.schedules.values()),
                            make_triggers=configured_triggers,
                        )
                    )
                    await anyio.to_thread.run_sync(_warm_up, new.project, new.triggers)
                except ConfigError as exc:
                    self.events.publish("reload_failed", problems=[str(p) for p in exc.problems])
                    raise
                report = await self._apply(new)
                freeze_heap()  # the old project may be garbage now; the new one is frozen
            finally:
                self.notifier.ready(self.status_line())
        log.info("reloaded", **report)
        self.events.publish("reloaded", **report)
        return report

    async def _apply(self, new: Any) -> dict[str, Any]:
        from . import reload as reloading

        assert self.dispatcher is not None
        current = {name: state.cfg for name, state in self.dispatcher.triggers.items()}
        delta = reloading.diff(current, new.triggers)
        restart = reloading.restart_required(self.settings, new.settings)
        old_pipelines = set(self.project.pipelines)
        self.settings = new.settings
        self.dispatcher.settings = new.settings
        new.project.runner.executor = self.project.runner.executor
        self.project = new.project
        if self._executor is not None:
            self._executor.runner = new.project.runner
        self.triggers = new.triggers
        by_name = {t.name: t for t in new.triggers}
        for name in [*delta.removed, *delta.changed]:
            await self.remove_trigger(name)
        for name in [*delta.added, *delta.changed]:
            await self.add_trigger(by_name[name])
        return {
            "added": delta.added,
            "removed": delta.removed,
            "changed": delta.changed,
            "pipelines_added": sorted(set(new.project.pipelines) - old_pipelines),
            "pipelines_removed": sorted(old_pipelines - set(new.project.pipelines)),
            "restart_required": restart,
        }

    # ---------------------------------------------------------- run time changes

    def trigger_origin(self, name: str) -> str:
        """Where a trigger comes from: ``config``, ``project`` (pipeline schedule), ``dynamic``."""
        if name in self.schedules.schedules:
            return "dynamic"
        return "project" if name.startswith("schedule:") else "config"

    def manual_request(
        self, pipeline: str, inputs: dict[str, Any], overrides: dict[str, Any]
    ) -> RunRequest:
        """A run request for ``flowerpowerctl run``, replying on the configured result topic."""
        from ..mqtt.sinks import reply_target

        request = RunRequest(
            pipeline=pipeline,
            inputs=inputs,
            overrides=overrides,
            trigger=TriggerInfo(name="manual", type="manual"),
        )
        reply = reply_target(
            pipeline=pipeline,
            trigger="manual",
            run_id=request.run_id,
            fields={},
            result_topic=self.settings.mqtt.result_topic,
            error_topic=self.settings.mqtt.error_topic,
        )
        return RunRequest(
            pipeline=pipeline,
            inputs=inputs,
            overrides=overrides,
            run_id=request.run_id,
            trigger=request.trigger,
            queued_at=request.queued_at,
            reply=reply,
        )

    def submit_run(self, request: RunRequest, *, run_at: datetime | None = None) -> ActiveJob:
        """Start a manual run (now or at ``run_at``) in the run task group; returns at once."""
        from ..control.protocol import ProtocolError

        if self._runs is None or self.dispatcher is None or self.stopping:
            raise ProtocolError("unavailable", "the daemon is starting or stopping")
        return self.jobs.submit(request, self.dispatcher.run_request, self._runs, run_at=run_at)

    async def add_trigger(self, cfg: Any) -> None:
        """Register a trigger and start its source (MQTT: subscribe to its topic)."""
        assert self.dispatcher is not None
        state = self.dispatcher.add_trigger(cfg)
        state.paused = cfg.name in self.schedules.paused
        await self._start_source(cfg)
        if isinstance(cfg, MqttTrigger):
            await self._update_subscriptions()
        self.events.publish(
            "trigger_added", name=cfg.name, pipeline=cfg.pipeline, trigger_type=cfg.type
        )

    async def remove_trigger(self, name: str) -> None:
        """Stop a trigger's source and forget it; its runs in flight go on."""
        assert self.dispatcher is not None
        scope = self._source_scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        self.timer_specs.pop(name, None)
        state = self.dispatcher.remove_trigger(name)
        if state is not None and isinstance(state.cfg, MqttTrigger):
            await self._update_subscriptions()
        self.events.publish("trigger_removed", name=name)

    async def add_schedule(self, schedule: Schedule, trigger: Any) -> None:
        """Persist a dynamic schedule, then arm it (replacing one with the same id)."""
        if schedule.id in self.schedules.schedules:
            await self.remove_trigger(schedule.id)
        self.schedules.schedules[schedule.id] = schedule
        await self.schedules.save()
        self.triggers = [t for t in self.triggers if t.name != schedule.id] + [trigger]
        await self.add_trigger(trigger)

    async def remove_schedule(self, schedule_id: str) -> None:
        """Disarm and forget a dynamic schedule (also its pause flag)."""
        self.schedules.schedules.pop(schedule_id, None)
        self.schedules.paused.discard(schedule_id)
        await self.schedules.save()
        self.triggers = [t for t in self.triggers if t.name != schedule_id]
        await self.remove_trigger(schedule_id)

    async def set_paused(self, names: list[str], paused: bool) -> list[str]:
        """Pause or resume triggers by name; the state is persisted."""
        assert self.dispatcher is not None
        for name in names:
            state = self.dispatcher.triggers.get(name)
            if state is not None:
                state.paused = paused
        self.schedules.set_paused(names, paused)
        await self.schedules.save()
        self.events.publish("paused" if paused else "resumed", names=names)
        return names

    async def _update_subscriptions(self) -> None:
        assert self.dispatcher is not None
        wanted = list(
            dict.fromkeys(
                (_subscription(s.cfg), s.cfg.qos)
                for s in self.dispatcher.triggers.values()
                if isinstance(s.cfg, MqttTrigger)
            )
        )
        update = getattr(self.link, "set_subscriptions", None)
        if update is not None:
            await update(wanted)

    async def _start_source(self, trig: Any) -> None:
        if self._sources is None or self._runs is None:
            return
        if isinstance(trig, CronTrigger | IntervalTrigger | DateTrigger | FileTrigger):
            await self._sources.start(self._source, trig, self._runs, name=f"source:{trig.name}")

    async def _source(
        self,
        trig: Any,
        runs: TaskGroup,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """One timer or file source in its own cancel scope; a failing one is logged, not fatal."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        with anyio.CancelScope() as scope:
            self._source_scopes[trig.name] = scope
            try:
                if isinstance(trig, FileTrigger):
                    await self._file_source(trig, runs, task_status=_Started(ready))
                else:
                    await self._timer_source(trig, runs, task_status=_Started(ready))
            except Exception:
                log.exception("trigger_source_failed", trigger=trig.name)
            finally:
                ready()
                if self._source_scopes.get(trig.name) is scope:
                    del self._source_scopes[trig.name]
        if (
            not scope.cancel_called
            and isinstance(trig, DateTrigger)
            and trig.name in self.schedules.schedules
            and not self.stopping
        ):
            # A one-shot dynamic schedule has fired: it is done.
            with anyio.CancelScope(shield=True):
                await self.remove_schedule(trig.name)

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        st = self.stats
        mqtt = "up" if self.link is not None and self.link.connected else "down"
        n = len(self.dispatcher.triggers) if self.dispatcher else len(self.triggers)
        return (
            f"{n} triggers, {st.runs_ok} ok, {st.runs_failed} failed, "
            f"{st.in_flight} running, mqtt {mqtt}"
        )

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
                        "user_properties": msg.user_properties,
                    },
                    ack=ack,
                )
                await dispatcher.submit(event, runs)

    async def _timer_source(
        self,
        trig: Any,
        runs: TaskGroup,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from ..sources.timers import TimerSpec, timer_events
        from ..state.timerstate import lock_ttl

        assert self.dispatcher is not None
        state = self.timer_state
        last = None
        if state is not None:
            if isinstance(trig, IntervalTrigger) and trig.start_at is None:
                # A grid that survives restarts and is shared by daemons on one Redis.
                last = await state.anchor(trig.name, utcnow())
            else:
                last = await state.last_fire(trig.name)
        if isinstance(trig, CronTrigger):
            spec = TimerSpec(trig.name, "cron", cron=trig.cron, timezone=trig.timezone)
        elif isinstance(trig, IntervalTrigger):
            # Anchored at the last fire or now (as timer_events would), so `triggers` can
            # show the next fire.
            spec = TimerSpec(
                trig.name, "interval", every=trig.every, start_at=trig.start_at or last or utcnow()
            )
        else:
            spec = TimerSpec(trig.name, "date", date=trig.at)
        spec = replace(
            spec,
            jitter=getattr(trig, "jitter", 0.0),
            misfire_grace=trig.misfire_grace,
            catch_up=trig.catch_up,
            max_catch_up=trig.max_catch_up,
        )
        self.timer_specs[trig.name] = spec
        task_status.started()
        ttl = lock_ttl(spec.misfire_grace)
        async for event in timer_events(spec, last_fire=last):
            scheduled = datetime.fromtimestamp(event.meta["scheduled_ts"], UTC)
            # Several daemons on one Redis: only the one that takes the tick's lock fires it.
            if state is not None and not await state.claim(trig.name, scheduled, ttl):
                log.debug("timer_tick_taken", trigger=trig.name, scheduled=scheduled.isoformat())
                continue
            await self.dispatcher.submit(event, runs)
            if state is not None:
                with anyio.CancelScope(shield=True):  # a run that was submitted is recorded
                    await state.record(trig.name, scheduled)

    async def _file_source(
        self,
        trig: FileTrigger,
        runs: TaskGroup,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from ..sources.files import file_events

        assert self.dispatcher is not None
        if not await anyio.Path(trig.path).is_dir():
            log.error("file_trigger_disabled_missing_directory", trigger=trig.name, path=trig.path)
            task_status.started()
            return
        async for event in file_events(
            trig.name,
            trig.path,
            patterns=trig.patterns,
            recursive=trig.recursive,
            events=trig.events,
            debounce_ms=int(trig.debounce * 1000),
            ready=task_status.started,
        ):
            await self.dispatcher.submit(event, runs)


def _merge(configured: list[Any], dynamic: list[Any]) -> list[Any]:
    """Configured triggers plus dynamic schedules; a dynamic one never shadows a configured name."""
    names = {t.name for t in configured}
    for trig in dynamic:
        if trig.name in names:
            log.error("dynamic_schedule_shadowed", schedule=trig.name)
    return configured + [t for t in dynamic if t.name not in names]


def _warm_up(project: FlowerPowerProject, triggers: list[Any]) -> None:
    """Import modules and build drivers for the triggered pipelines (worker thread)."""
    for trig in triggers:
        try:
            project.runner.prepare(trig.pipeline, trig.run)
        except FlowerPowerError as exc:
            log.error(
                "pipeline_not_ready", trigger=trig.name, pipeline=trig.pipeline, error=str(exc)
            )


class _Started:
    """A TaskStatus that calls ``ready`` (the source's own start signal)."""

    def __init__(self, ready: Callable[[], None]) -> None:
        self._ready = ready

    def started(self, value: None = None) -> None:
        self._ready()


def _subscription(trig: MqttTrigger) -> str:
    from ..sources.mqtt import compile_topic

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
