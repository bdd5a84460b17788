"""The daemon's control plane: :class:`Controls` implements :class:`~..control.api.DaemonControl`.

It holds what the verbs act on (settings, project, triggers, dynamic
schedules, the job tracker, manual runs) and the running parts the daemon
wires in (:meth:`Controls.attach`): adding and removing triggers and
schedules, pausing, manual and delayed runs (``manual.py``), status and
counters, reload. The daemon itself (``daemon.py``) only builds, starts and
stops things.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread
import orjson
import structlog
from anyio.abc import TaskGroup

from ..control.api import (
    ActiveRun,
    FleetDaemon,
    JobState,
    ReloadReport,
    StatusInfo,
    TriggerOrigin,
    TriggerStatus,
    WorkerInfo,
)
from ..control.events import EventBus
from ..control.protocol import ProtocolError
from ..errors import ConfigError
from ..project.api import FlowerPowerProject
from ..project.hooks import ConfigHook
from ..project.models import RunRequest, RunResult, utcnow
from ..redact import redact_url
from ..settings import MqttTrigger, Settings, Trigger
from ..state.history import JobHistory
from ..state.schedules import Schedule, ScheduleStore
from ..version import __version__
from . import reload as reloading
from .check import configured_triggers
from .jobs import JobTracker
from .lifecycle import freeze_heap
from .manual import ManualRuns
from .sources import Sources, subscriptions
from .systemd import Notifier

if TYPE_CHECKING:
    from ..control.server import ControlServer
    from ..dispatch.dispatcher import Dispatcher, Stats
    from ..mqtt.link import MqttLink
    from ..mqtt.sinks import MqttResultSink
    from ..queue.broker import RunExecutor
    from .homeassistant import HomeAssistant

__all__ = ["Controls"]

log = structlog.get_logger("flowerpower_daemon.daemon")


class Controls:
    """What the control commands see of the running daemon, and the verbs they call."""

    def __init__(
        self,
        settings: Settings,
        project: FlowerPowerProject,
        *,
        config_path: str | None,
        stats: Stats,
        history: JobHistory | None,
        notifier: Notifier,
    ) -> None:
        self._settings = settings
        self._project = project
        #: Absolute: ``status`` and ``reload`` must mean the same file from any directory.
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.stats = stats
        self._history = history
        self.notifier = notifier
        self._events = EventBus()
        self.jobs = JobTracker(history, self._events, remote=settings.queue.is_redis)
        self._schedules = ScheduleStore.load(settings.state_path)
        self.manual = ManualRuns(self.jobs, self._schedules)
        self.triggers_at_start = _merge(
            configured_triggers(settings, project), self._schedules.triggers()
        )
        self.started_at = utcnow()
        self._started = time.monotonic()
        self._stop = anyio.Event()
        self.leaving = False  # the stop asked is for good (see request_stop)
        self._ready = False
        self._reload_lock = anyio.Lock()
        # The running parts, wired in by the daemon (attach) once they exist.
        self.dispatcher: Dispatcher | None = None
        self.sources: Sources | None = None
        self.link: MqttLink | None = None
        self.publisher: MqttLink | None = None
        self.sink: MqttResultSink | None = None
        self.server: ControlServer | None = None
        self.executor: RunExecutor | None = None
        self.homeassistant: HomeAssistant | None = None
        #: Redis queue: the live workers, as :meth:`watch_workers` last read them.
        self.workers: list[WorkerInfo] = []

    # ------------------------------------------------------------ wiring

    def attach(
        self,
        *,
        dispatcher: Dispatcher,
        sources: Sources,
        runs: TaskGroup,
    ) -> None:
        """The dispatcher, sources and run task group exist: verbs can act on them."""
        self.dispatcher, self.sources = dispatcher, sources
        self.manual.attach(dispatcher.run_request, runs)
        for name in self._schedules.paused & set(dispatcher.triggers):
            dispatcher.triggers[name].paused = True

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    async def stopped(self) -> None:
        """Wait for :meth:`request_stop` (a signal or ``flowerpowerctl stop``)."""
        await self._stop.wait()

    # ------------------------------------------------------ DaemonControl

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def project(self) -> FlowerPowerProject:
        return self._project

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def events(self) -> EventBus:
        return self._events

    @property
    def history(self) -> JobHistory | None:
        return self._history

    @property
    def schedules(self) -> ScheduleStore:
        return self._schedules

    def request_stop(self, *, leave: bool = False) -> None:
        """Begin a graceful shutdown (as SIGTERM). ``leave``: for good, not to come back
        (``flowerpowerctl stop --leave``): the MQTT subscriptions and session go first."""
        if leave and not self._stop.is_set():
            self.leaving = True
        self._stop.set()

    def status(self) -> StatusInfo:
        s = self._settings
        st = self.stats
        link, publisher, server, history = self.link, self.publisher, self.server, self._history
        return {
            "version": __version__,
            "pid": os.getpid(),
            "state": "stopping" if self.stopping else ("running" if self._ready else "starting"),
            "started_at": self.started_at.isoformat(),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "config": self.config_path,
            "project": s.project,
            "state_dir": str(s.state_path),
            "socket": str(server.path) if server else None,
            "mqtt": {
                "broker": "embedded"
                if s.mqtt.url == "embedded"
                else f"{s.mqtt.host}:{s.mqtt.port}",
                "client_id": s.mqtt.client_id,
                "connected": bool(link and link.connected),
                "connects": link.connects if link else 0,
                "outbox": publisher.outbox_size if publisher else 0,
                "published": publisher.published if publisher else 0,
                "held": link.held if link else 0,
                "intake_pauses": link.pauses if link else 0,
            },
            "queue": {
                "backend": "redis" if s.queue.is_redis else "memory",
                "broker": redact_url(s.queue.broker),
                "shared_state": redact_url(s.shared_state) if s.shared_state else None,
            },
            "counters": {
                "messages_in": st.messages_in,
                "events": st.events,
                "runs_ok": st.runs_ok,
                "runs_failed": st.runs_failed,
                "bad_input": st.bad_input,
                "skipped": st.skipped,
                "duplicates": st.duplicates,
                "coalesced": st.coalesced,
                "unmatched": st.unmatched,
                "results_out": self.sink.results_out if self.sink else 0,
            },
            "in_flight": st.in_flight,
            "active": [j.summary() for j in self.jobs.active.values()],
            "pipelines": len(self._project.pipelines),
            "triggers": len(
                self.dispatcher.triggers if self.dispatcher else self.triggers_at_start
            ),
            "paused": sorted(self._schedules.paused),
            "history": {
                "recorded": history.recorded if history else 0,
                "location": history.location if history else None,
            },
            "control": {
                "clients": server.clients if server else 0,
                "requests": server.requests if server else 0,
            },
            "workers": self.workers,
        }

    async def watch_workers(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Redis queue: read the live workers for ``status`` every 2 s (``status`` is sync)."""
        queue = self._settings.queue
        if not queue.is_redis:
            task_status.started()
            return
        from ..queue.streams import WorkerPresence

        failing = False
        async with WorkerPresence(queue.redis, queue.queue_name) as presence:
            task_status.started()
            while True:
                try:
                    self.workers = list(await presence.live())
                    failing = False
                except Exception as exc:  # redis.RedisError, OSError: keep the last listing
                    if not failing:
                        log.warning("workers_listing_failed", error=str(exc))
                    failing = True
                await anyio.sleep(2.0)

    async def fleet_status(self, wait: float) -> list[FleetDaemon]:
        from ..mqtt.client import MqttError, retained_messages

        # The link's settings: with the embedded broker they name where it listens.
        mqtt = self.link.settings if self.link is not None else self._settings.mqtt
        if not mqtt.status_topic:
            return []
        try:
            with anyio.fail_after(wait + 10):  # + connecting (the client's own 10 s bound)
                found = await retained_messages(mqtt, mqtt.fleet_status_filter, wait)
        except (MqttError, TimeoutError, OSError) as exc:
            raise ConnectionError(f"broker {mqtt.host}:{mqtt.port}: {exc}") from None
        own = mqtt.own_status_topic
        return sorted(
            (
                fleet_daemon(topic, payload, own, mqtt.status_topic)
                for topic, payload in found.items()
            ),
            key=lambda d: (d["client_id"], d["topic"]),
        )

    def not_ready(self) -> str | None:
        """Why the daemon cannot take triggers now (``/readyz``'s 503), or None when it can:
        started, MQTT connected (subscribed: the link connects only once subscribed), the
        Redis queue taking runs, every timer and file trigger armed, not stopping."""
        if self.stopping:
            return "stopping"
        if not self._ready:
            return "starting (MQTT not connected yet or sources not armed)"
        link = self.link
        if link is None or not link.connected:
            mqtt = link.settings if link is not None else self._settings.mqtt
            return f"MQTT broker {mqtt.host}:{mqtt.port} not connected"
        if self.dispatcher is not None and self.dispatcher.enqueues_retrying:
            error = redact_url(self.dispatcher.enqueue_error or "")
            return (
                f"the Redis queue does not take runs ({self.dispatcher.enqueues_retrying} "
                f"enqueue(s) retrying): {error}"
            )
        if self.dispatcher is not None and self.sources is not None:
            unarmed = self.sources.unarmed(self.dispatcher.triggers)
            if unarmed:
                return "triggers not armed: " + ", ".join(sorted(unarmed))
        return None

    def status_line(self) -> str:
        """One line for systemd's ``STATUS=``."""
        st = self.stats
        mqtt = "up" if self.link is not None and self.link.connected else "down"
        n = len(self.dispatcher.triggers if self.dispatcher else self.triggers_at_start)
        return (
            f"{n} triggers, {st.runs_ok} ok, {st.runs_failed} failed, "
            f"{st.in_flight} running, mqtt {mqtt}"
        )

    def triggers(self) -> list[TriggerStatus]:
        from ..sources.timers import next_fire

        if self.dispatcher is None:
            return []
        specs = self.sources.timer_specs if self.sources else {}
        now = utcnow()
        out = []
        for name, state in self.dispatcher.triggers.items():
            spec = specs.get(name)
            dynamic = self._schedules.schedules.get(name)
            out.append(
                TriggerStatus(
                    cfg=state.cfg,
                    origin=self._origin(name),
                    paused=state.paused,
                    next_fire=next_fire(spec, now) if spec is not None else None,
                    fired=state.fired,
                    ok=state.ok,
                    failed=state.failed,
                    skipped=state.skipped,
                    running=len(state.running),
                    created_at=dynamic.created_at if dynamic else None,
                )
            )
        return out

    def active_runs(self) -> Mapping[str, ActiveRun]:
        return self.jobs.active

    def manual_request(
        self, pipeline: str, inputs: Mapping[str, object], overrides: Mapping[str, object]
    ) -> RunRequest:
        return self.manual.request(self._settings.mqtt, pipeline, inputs, overrides)

    async def submit_run(self, request: RunRequest, *, run_at: datetime | None = None) -> JobState:
        if not self.manual.attached or self.stopping:
            raise ProtocolError("unavailable", "the daemon is starting or stopping")
        return await self.manual.submit(request, run_at)

    async def wait_run(self, run_id: str) -> RunResult | None:
        return await self.jobs.wait(run_id)

    async def cancel_run(self, run_id: str) -> bool:
        return await self.manual.cancel(run_id)

    # ---------------------------------------------------- triggers, schedules

    async def add_trigger(self, cfg: Trigger) -> None:
        """Register a trigger and start its source (MQTT: subscribe to its topic)."""
        assert self.dispatcher is not None
        state = self.dispatcher.add_trigger(cfg)
        state.paused = cfg.name in self._schedules.paused
        if self.sources is not None:
            await self.sources.start(cfg)
        if isinstance(cfg, MqttTrigger):
            await self._update_subscriptions()
        self._events.publish(
            "trigger_added", name=cfg.name, pipeline=cfg.pipeline, trigger_type=cfg.type
        )

    async def remove_trigger(self, name: str) -> None:
        """Stop a trigger's source and forget it; its runs in flight go on."""
        assert self.dispatcher is not None
        if self.sources is not None:
            self.sources.stop(name)
        state = self.dispatcher.remove_trigger(name)
        if state is not None and isinstance(state.cfg, MqttTrigger):
            await self._update_subscriptions()
        self._events.publish("trigger_removed", name=name)

    async def add_schedule(self, schedule: Schedule) -> None:
        """Arm and persist a dynamic schedule. Under the reload lock, as every change of the
        dynamic schedules: a reload compares the triggers with the schedules it started with."""
        trigger = schedule.to_trigger()
        async with self._reload_lock:
            if schedule.id in self._schedules.schedules:
                await self.remove_trigger(schedule.id)
            self._schedules.schedules[schedule.id] = schedule
            await self._schedules.save()
            await self.add_trigger(trigger)

    async def remove_schedule(self, schedule_id: str) -> None:
        """Disarm and forget a dynamic schedule (also its pause flag)."""
        async with self._reload_lock:
            await self._remove_schedule(schedule_id)

    async def _remove_schedule(self, schedule_id: str) -> None:
        self._schedules.schedules.pop(schedule_id, None)
        self._schedules.paused.discard(schedule_id)
        await self._schedules.save()
        await self.remove_trigger(schedule_id)

    async def fired_once(self, name: str) -> None:
        """A date trigger has fired: a one-shot dynamic schedule is done."""
        async with self._reload_lock:
            if name in self._schedules.schedules:
                await self._remove_schedule(name)

    async def set_paused(self, names: Sequence[str], paused: bool) -> list[str]:
        assert self.dispatcher is not None
        for name in names:
            state = self.dispatcher.triggers.get(name)
            if state is not None:
                state.paused = paused
        self._schedules.set_paused(names, paused)
        await self._schedules.save()
        self._events.publish("paused" if paused else "resumed", names=list(names))
        return list(names)

    def _origin(self, name: str) -> TriggerOrigin:
        if name in self._schedules.schedules:
            return "dynamic"
        return "project" if name.startswith("schedule:") else "config"

    async def _update_subscriptions(self) -> None:
        assert self.dispatcher is not None
        if self.link is not None:
            cfgs = [s.cfg for s in self.dispatcher.triggers.values()]
            await self.link.set_subscriptions(subscriptions(cfgs))

    # ------------------------------------------------------------ reload

    async def reload(self) -> ReloadReport:
        """Validate the new config and project, then apply the difference; else ConfigError.

        In-flight runs keep the runner they started with; triggers that did
        not change keep their state (counters, pause, running runs).
        """
        async with self._reload_lock:
            self.notifier.reloading()
            self._events.publish("reloading")
            try:
                try:
                    dynamic = list(self._schedules.schedules.values())
                    new = await anyio.to_thread.run_sync(
                        reloading.prepare, self.config_path, dynamic
                    )
                    await anyio.to_thread.run_sync(reloading.warm_up, new.project, new.triggers)
                    hooks = await anyio.to_thread.run_sync(
                        reloading.load_hooks, new.project, new.triggers
                    )
                except ConfigError as exc:
                    self._events.publish("reload_failed", problems=[str(p) for p in exc.problems])
                    raise
                report = await self._apply(new, hooks)
                freeze_heap()  # the old project may be garbage now; the new one is frozen
            finally:
                self.notifier.ready(self.status_line())
        log.info("reloaded", **report)
        self._events.publish("reloaded", **report)
        return report

    async def _apply(
        self, new: reloading.Prepared, hooks: dict[str, ConfigHook]
    ) -> ReloadReport:
        assert self.dispatcher is not None
        self.dispatcher.config_hooks = hooks  # before the chains are built again below
        current = {name: state.cfg for name, state in self.dispatcher.triggers.items()}
        delta = reloading.diff(current, new.triggers)
        restart = reloading.restart_required(self._settings, new.settings)
        old_pipelines = set(self._project.pipelines)
        self._settings = new.settings
        self.dispatcher.settings = new.settings
        new.project.runner.executor = self._project.runner.executor
        self._project = new.project
        if self.executor is not None:
            self.executor.runner = new.project.runner
        by_name = {t.name: t for t in new.triggers}
        for name in [*delta.removed, *delta.changed]:
            await self.remove_trigger(name)
        for name in [*delta.added, *delta.changed]:
            await self.add_trigger(by_name[name])
        if self.homeassistant is not None:  # buttons follow the triggers above
            await self.homeassistant.update(new.settings, new.project.pipelines)
        if set(new.project.pipelines) != old_pipelines and self.link and self.link.online:
            await self.link.announce_online()  # the retained status names the pipelines
        return {
            "added": delta.added,
            "removed": delta.removed,
            "changed": delta.changed,
            "pipelines_added": sorted(set(new.project.pipelines) - old_pipelines),
            "pipelines_removed": sorted(old_pipelines - set(new.project.pipelines)),
            "pipelines": sorted(new.project.pipelines),
            "restart_required": restart,
        }


def _merge(configured: list[Trigger], dynamic: Sequence[Trigger]) -> list[Trigger]:
    """Configured triggers plus dynamic schedules; a dynamic one never shadows a configured name."""
    names = {t.name for t in configured}
    for trig in dynamic:
        if trig.name in names:
            log.error("dynamic_schedule_shadowed", schedule=trig.name)
    return configured + [t for t in dynamic if t.name not in names]


def fleet_daemon(
    topic: str, payload: bytes, own_topic: str, template: str = "{client_id}"
) -> FleetDaemon:
    """One retained status message as a :class:`FleetDaemon` row (any payload); without a
    ``client_id`` in the payload, the one the topic has where ``template`` says."""
    try:
        data: object = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = payload.decode("utf-8", "replace")
    row: FleetDaemon = {"topic": topic, "client_id": "", "status": "", "self": topic == own_topic}
    if isinstance(data, dict):
        status, client_id = data.get("status"), data.get("client_id")
        row["status"] = str(status) if status is not None else ""
        if client_id is not None:
            row["client_id"] = str(client_id)
        version, host, pid = data.get("version"), data.get("host"), data.get("pid")
        pipelines = data.get("pipelines")
        if isinstance(version, str):
            row["version"] = version
        if isinstance(host, str):
            row["host"] = host
        if isinstance(pid, int):
            row["pid"] = pid
        if isinstance(pipelines, list):
            row["pipelines"] = [str(p) for p in pipelines]
    else:
        row["status"] = str(data)
    if not row["client_id"]:
        row["client_id"] = _client_id_in(topic, template)
    return row


def _client_id_in(topic: str, template: str) -> str:
    """What stands for ``{client_id}`` in ``topic`` (status topic ``template``), or ''."""
    levels, parts = template.split("/"), topic.split("/")
    if len(levels) != len(parts):
        return ""
    for level, part in zip(levels, parts, strict=True):
        if "{client_id}" in level:
            before, _, after = level.partition("{client_id}")
            if part.startswith(before) and part.endswith(after):
                return part[len(before) : len(part) - len(after)]
    return ""
