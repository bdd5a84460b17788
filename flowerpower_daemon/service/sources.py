"""The daemon's sources: one task per timer or file trigger, plus the MQTT intake.

Each timer or file trigger runs in a task of the ``sources`` task group
(inside the daemon's one root task group) with a cancel scope of its own,
so that a reload or ``schedule rm`` stops exactly that trigger; a source
that fails is logged and does not take the daemon down. MQTT triggers share
one intake loop over the link's messages: the dispatcher matches each topic
to its triggers. Every event goes to :meth:`Dispatcher.submit
<flowerpower_daemon.dispatch.dispatcher.Dispatcher.submit>`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from ..observe.metrics import NO_METRICS, Metrics
from ..project.models import utcnow
from ..settings import (
    CronTrigger,
    DateTrigger,
    FileTrigger,
    IntervalTrigger,
    MqttTrigger,
    TimerTrigger,
    Trigger,
)
from ..sources.base import TriggerEvent
from ..topics import compile_topic

if TYPE_CHECKING:
    from ..dispatch.dispatcher import Dispatcher, Stats
    from ..mqtt.link import MqttLink
    from ..sources.timers import TimerSpec
    from ..state.timerstate import TimerState

__all__ = ["Sources", "subscription", "subscriptions"]

log = structlog.get_logger("flowerpower_daemon.daemon")


class Sources:
    """Starts and stops the source of each trigger; knows each timer's spec (next fire)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        stats: Stats,
        timer_state: TimerState | None,
        *,
        fired_once: Callable[[str], Awaitable[None]],
        stopping: Callable[[], bool],
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.stats = stats
        self.timer_state = timer_state
        #: Trigger name -> its timer (``triggers`` shows the next fire from it).
        self.timer_specs: dict[str, TimerSpec] = {}
        self._fired_once = fired_once  # a one-shot date trigger has fired (schedule done)
        self._stopping = stopping
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None
        self._runs: TaskGroup | None = None

    async def run_all(
        self, group: TaskGroup, runs: TaskGroup, link: MqttLink, triggers: Iterable[Trigger]
    ) -> None:
        """Start the MQTT intake and every timer and file source in ``group``; runs go to
        ``runs``. Returns once each source is armed."""
        self._group, self._runs = group, runs
        # Always consumed: reload and `schedule add` may add MQTT triggers later.
        group.start_soon(self._mqtt_intake, link, runs, name="source:mqtt")
        for trig in triggers:
            await self.start(trig)

    async def start(self, trig: Trigger) -> None:
        """Start ``trig``'s source (none for MQTT: the intake serves every topic)."""
        if self._group is None or self._runs is None or isinstance(trig, MqttTrigger):
            return
        await self._group.start(self._source, trig, self._runs, name=f"source:{trig.name}")

    def unarmed(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, the timer and file triggers whose source is not running (it failed,
        or a file trigger's directory is missing); date triggers end once fired."""
        triggers = self.dispatcher.triggers
        return [
            name
            for name in names
            if name in triggers
            and isinstance(triggers[name].cfg, IntervalTrigger | FileTrigger | CronTrigger)
            and name not in self._scopes
        ]

    def stop(self, name: str) -> None:
        """Stop a trigger's source; its runs in flight go on."""
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        self.timer_specs.pop(name, None)

    async def _source(
        self,
        trig: TimerTrigger | FileTrigger,
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
            self._scopes[trig.name] = scope
            try:
                if isinstance(trig, FileTrigger):
                    await self._files(trig, runs, ready)
                else:
                    await self._timer(trig, runs, ready)
            except Exception:
                log.exception("trigger_source_failed", trigger=trig.name)
            finally:
                ready()
                if self._scopes.get(trig.name) is scope:
                    del self._scopes[trig.name]
        if not scope.cancel_called and isinstance(trig, DateTrigger) and not self._stopping():
            with anyio.CancelScope(shield=True):
                await self._fired_once(trig.name)

    async def _mqtt_intake(self, link: MqttLink, runs: TaskGroup) -> None:
        dispatcher, metrics = self.dispatcher, self.metrics
        async for msg in link.messages():
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
                metrics.fired(state.cfg.name)
                await dispatcher.submit(event, runs)

    async def _timer(
        self, trig: TimerTrigger, runs: TaskGroup, started: Callable[[], None]
    ) -> None:
        from ..sources.timers import TimerSpec, timer_events
        from ..state.timerstate import lock_ttl

        state = self.timer_state
        last = None
        if state is not None:
            if isinstance(trig, IntervalTrigger) and trig.start_at is None:
                # A grid that survives restarts and is shared by daemons on one Redis.
                last = await state.anchor(trig.name, utcnow())
            else:
                last = await state.last_fire(trig.name)
        if isinstance(trig, IntervalTrigger):
            # Anchored at the last fire or now (as timer_events would), so `triggers` can
            # show the next fire.
            start = trig.start_at or last or utcnow()
            spec = TimerSpec(trig.name, "interval", every=trig.every, start_at=start)
            spec = replace(spec, jitter=trig.jitter)
        elif isinstance(trig, DateTrigger):
            spec = TimerSpec(trig.name, "date", date=trig.at)
        else:
            spec = TimerSpec(trig.name, "cron", cron=trig.cron, timezone=trig.timezone)
            spec = replace(spec, jitter=trig.jitter)
        spec = replace(
            spec,
            misfire_grace=trig.misfire_grace,
            catch_up=trig.catch_up,
            max_catch_up=trig.max_catch_up,
        )
        self.timer_specs[trig.name] = spec
        started()
        ttl = lock_ttl(spec.misfire_grace)
        async for event in timer_events(spec, last_fire=last):
            scheduled = datetime.fromtimestamp(event.meta["scheduled_ts"], UTC)
            # Several daemons on one Redis: only the one that takes the tick's lock fires it.
            if state is not None and not await state.claim(trig.name, scheduled, ttl):
                log.debug("timer_tick_taken", trigger=trig.name, scheduled=scheduled.isoformat())
                continue
            self.metrics.fired(trig.name)
            if not event.meta.get("catch_up"):  # a catch-up fire is late by design
                self.metrics.timer_fired(trig.name, (event.at - scheduled).total_seconds())
            if state is not None:
                # Recorded when the dispatcher acks the event: once its run has ended (memory
                # queue), is in the Redis stream, or was turned away. Not before (a fire lost in
                # a crash is caught up at the restart: at least once), and not between the
                # wake and the run's start, where the store's thread hop would compete with it.
                event = replace(event, ack=partial(_record, state, trig.name, scheduled))
            await self.dispatcher.submit(event, runs)

    async def _files(self, trig: FileTrigger, runs: TaskGroup, started: Callable[[], None]) -> None:
        from ..sources.files import file_events

        if not await anyio.Path(trig.path).is_dir():
            log.error("file_trigger_disabled_missing_directory", trigger=trig.name, path=trig.path)
            return
        async for event in file_events(
            trig.name,
            trig.path,
            patterns=trig.patterns,
            recursive=trig.recursive,
            events=trig.events,
            debounce_ms=int(trig.debounce * 1000),
            ready=started,
        ):
            self.metrics.fired(trig.name)
            await self.dispatcher.submit(event, runs)


async def _record(state: TimerState, name: str, scheduled: datetime) -> None:
    """A timer event's ack: store its fire time (shielded: a run that ended is recorded)."""
    with anyio.CancelScope(shield=True):
        await state.record(name, scheduled)


def subscription(trig: MqttTrigger) -> str:
    """The topic filter an MQTT trigger subscribes to (``$share/...`` for a shared group)."""
    topic = compile_topic(trig.topic).filter
    return f"$share/{trig.shared_group}/{topic}" if trig.shared_group else topic


def subscriptions(triggers: Iterable[Trigger]) -> list[tuple[str, int]]:
    """The MQTT triggers' (filter, QoS) pairs, each once, in order."""
    return list(
        dict.fromkeys((subscription(t), t.qos) for t in triggers if isinstance(t, MqttTrigger))
    )


def _countdown(n: int, ack: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """An ack that fires the real one after ``n`` calls (one message, several triggers)."""
    remaining = [n]

    async def countdown() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            await ack()

    return countdown
