"""The tasks that run plain triggers' events: at most one per global run slot, reused.

A task per event cost more than the rest of the dispatch (anyio's task
bookkeeping, ~10 us against ~2 us for the coroutine itself), and under load
most of those tasks only waited for a global slot. Events of triggers with no
limit of their own (no ``max_concurrent``, ``key`` or ``overlap: replace``)
on the memory queue are handed instead to a *carrier*: a task that runs one
event, then the oldest queued one, and so on. There are at most as many
carriers as global slots; an event that finds them all busy is queued (the
dispatcher's handler bound, taken before, bounds the queue). A carrier that
finds the queue empty waits ``linger`` seconds for the next event before it
ends, so a steady stream reuses its carriers, and nothing is left to stop at
shutdown a moment after the last run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from anyio.abc import TaskGroup

from ..project.models import RunRequest
from .chain import Admission

__all__ = ["Carriers"]

Item = tuple[Admission, RunRequest]
Handle = Callable[[Admission, RunRequest], Awaitable[None]]

LINGER = 0.02  # seconds an idle carrier waits for the next event


class Carriers:
    """Runs ``handle(admission, request)`` for each event handed over, in order of arrival."""

    def __init__(self, handle: Handle, slots: Callable[[], float], linger: float = LINGER) -> None:
        self._handle = handle
        self._slots = slots
        self._linger = linger
        #: Events waiting for a carrier, oldest first.
        self.queued: deque[Item] = deque()
        #: Carrier tasks alive (running an event or lingering).
        self.count = 0
        self._idle: deque[asyncio.Future[Item | None]] = deque()

    def hand(self, admission: Admission, request: RunRequest, runs: TaskGroup) -> None:
        """Give the event to an idle carrier, else to a new one if a slot is left, else queue it."""
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result((admission, request))
                return
        if self.count >= self._slots():
            self.queued.append((admission, request))
            return
        self.count += 1
        runs.start_soon(self._carry, admission, request, name=f"run:{request.run_id}")

    async def _carry(self, admission: Admission, request: RunRequest) -> None:
        queued, idle = self.queued, self._idle
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._handle(admission, request)
                if queued:
                    admission, request = queued.popleft()
                    continue
                waiter: asyncio.Future[Item | None] = loop.create_future()
                idle.append(waiter)
                timer = loop.call_later(self._linger, _expire, waiter)
                try:
                    item = await waiter
                except BaseException:
                    # Cancelled (the daemon stops) after an event was handed over: give it
                    # back, for a carrier that is not being cancelled, if any.
                    if waiter.done() and not waiter.cancelled():
                        handed = waiter.result()
                        if handed is not None:
                            queued.appendleft(handed)
                    raise
                finally:
                    timer.cancel()
                if item is None:  # lingered in vain; an event queued meanwhile is still ours
                    if not queued:
                        return
                    item = queued.popleft()
                admission, request = item
        finally:
            self.count -= 1


def _expire(waiter: asyncio.Future[Item | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
