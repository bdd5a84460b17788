"""When a timer fire is recorded in the timer store: once the dispatcher acks it.

Not before the hand-over (a fire lost in a crash must be caught up at the
restart: at least once) and not from the timer's task right after it, where
the store's thread hop would sit between the wake and the run's start: the
event carries an ack that records its scheduled time, which the dispatcher
calls once the run ended (memory queue), is in the Redis stream, or was
turned away. A real SQLite store; the dispatcher is a stand-in that keeps
the events handed to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel

from flowerpower_daemon.dispatch.dispatcher import Dispatcher, Stats
from flowerpower_daemon.mqtt.link import MqttLink
from flowerpower_daemon.service.sources import Sources
from flowerpower_daemon.settings import IntervalTrigger
from flowerpower_daemon.sources.base import TriggerEvent
from flowerpower_daemon.state.timerstate import SqliteTimerState


class HandedOver:
    """The dispatcher's part: keeps each submitted event, runs nothing."""

    def __init__(self) -> None:
        self.triggers: dict[str, Any] = {}
        self.events: list[TriggerEvent] = []
        self.two = anyio.Event()

    async def submit(self, event: TriggerEvent, runs: object) -> None:
        self.events.append(event)
        if len(self.events) == 2:
            self.two.set()


class NoMessages:
    async def messages(self) -> AsyncIterator[Any]:
        await anyio.sleep_forever()
        yield  # pragma: no cover


async def test_a_fire_is_recorded_when_the_dispatcher_acks_it(tmp_path: Path) -> None:
    trig = IntervalTrigger(name="tick", type="interval", pipeline="p", every=0.05)
    dispatcher = HandedOver()
    async with SqliteTimerState(tmp_path / "timers.sqlite3") as state:
        sources = Sources(
            cast(Dispatcher, dispatcher),
            Stats(),
            state,
            fired_once=lambda name: anyio.lowlevel.checkpoint(),
            stopping=lambda: False,
        )
        async with anyio.create_task_group() as group:
            await sources.run_all(group, group, cast(MqttLink, NoMessages()), [trig])
            with anyio.fail_after(5):
                await dispatcher.two.wait()
            group.cancel_scope.cancel()
        first, second = dispatcher.events[:2]
        scheduled = datetime.fromtimestamp(first.meta["scheduled_ts"], UTC)
        # Handed over, and the timer went on to its next fire: the store holds only the
        # interval's anchor (its start time), older than either fire.
        stored = await state.last_fire("tick")
        assert stored is not None and stored < scheduled
        assert first.ack is not None and second.ack is not None
        await first.ack()  # the run ended
        assert await state.last_fire("tick") == scheduled
        await second.ack()
        assert await state.last_fire("tick") == datetime.fromtimestamp(
            second.meta["scheduled_ts"], UTC
        )
