"""A fan-out of daemon events to ``flowerpowerctl events`` subscribers.

Publishing never waits: each subscriber has a bounded buffer, and a
subscriber that falls behind loses events (counted, and reported in the
next event it gets as ``"dropped": n``) instead of slowing the daemon down.
With no subscriber, publishing costs a dict lookup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..project.models import utcnow

__all__ = ["Event", "EventBus"]

#: One event: ``{"type": ..., "time": ..., **fields}`` (JSON-ready values).
Event = dict[str, object]


@dataclass(eq=False)
class _Subscriber:
    send: MemoryObjectSendStream[Event]
    dropped: int = field(default=0)


class EventBus:
    """Run and trigger events for whoever listens right now (nothing is stored)."""

    def __init__(self, buffer: int = 1000) -> None:
        self.buffer = buffer
        self._subscribers: set[_Subscriber] = set()
        self.published = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, /, **fields: object) -> None:
        """Send ``{"type": ..., "time": ..., **fields}`` to every subscriber, never waiting."""
        if not self._subscribers:
            return
        self.published += 1
        event = {"type": kind, "time": utcnow().isoformat(), **fields}
        for sub in list(self._subscribers):
            message = {**event, "dropped": sub.dropped} if sub.dropped else event
            try:
                sub.send.send_nowait(message)
            except anyio.WouldBlock:
                sub.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(sub)
            else:
                sub.dropped = 0

    @contextmanager
    def subscribe(self) -> Iterator[MemoryObjectReceiveStream[Event]]:
        """A receive stream of events from now on, until the ``with`` block ends."""
        send, receive = anyio.create_memory_object_stream[Event](self.buffer)
        sub = _Subscriber(send)
        self._subscribers.add(sub)
        try:
            with send, receive:
                yield receive
        finally:
            self._subscribers.discard(sub)
