"""A worker's loop over the Redis stream: each entry one run, at most ``concurrency`` at once.

taskiq's ``Receiver`` (the loop of ``taskiq worker``) is general: per message
it validates a pydantic ``TaskiqMessage``, looks for middlewares, builds a
dependency context, wraps the call in a task with its own timeout and
result object, and passes messages from a prefetch task to a runner task
through a queue. The worker runs one task, which takes one argument and
saves its own result; :class:`StreamConsumer` reads the same stream entries
(taskiq's message format, which :mod:`.enqueue` writes) with none of that:
about a third of a worker's CPU per run here (0.53 -> 0.33 ms).

What it keeps from taskiq's receiver, with ``ack_type`` ``when_saved``:

- a run's entry is acknowledged after the run has finished and its result
  is out (the ack goes with the worker's other writes, :mod:`..state.batch`),
  also when the run raised (logged with its traceback: running it again
  would fail again);
- an entry it cannot read, or that names another task, is logged and
  acknowledged (it would never run);
- a cancelled run is not acknowledged: its entry stays in the stream and
  another worker reclaims it;
- at most ``concurrency`` runs at once, and no entry is taken from the
  stream reader before a slot is free;
- a read of the stream takes the entries of the runs it can start now and
  of those its recent runs say it will start within ``READ_AHEAD``
  (:meth:`StreamConsumer.room`): a read's entries are this worker's until
  it acks them, so a worker that took more would keep them waiting while
  another worker idles (runs that take a second each: only as many as it
  has slots), and one that takes fewer wakes up per run (quick runs: a
  batch per read);
- a run gives its slot back as soon as it has its result
  (:data:`.broker.RUN_COMPUTED`): publishing the result (waiting for the
  MQTT broker's PUBACK), recording it and acknowledging the entry go on
  while the next run computes, for at most ``4 x concurrency`` runs at once
  (then no entry is taken until one is done: the PUBACKs pace the worker).
  The entry is still acknowledged only after its result is out;
- the runs are tasks of the caller's task group: :meth:`StreamConsumer.consume`
  returns when ``finish`` is set (it reads nothing more), and an error of
  the stream reader (Redis gone) ends it, the runs going on; the caller
  waits for them (:meth:`StreamConsumer.drained`) or cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

import anyio
import orjson
import structlog
from anyio.abc import TaskGroup
from taskiq import AckableMessage

from .broker import RUN_COMPUTED

__all__ = ["StreamConsumer"]

#: Runs taken per slot at most: one computing, the others' results on their way out.
FINISHING = 4
#: A read of the stream takes the entries of the runs the worker expects to start within
#: this long besides those it can start now (judged by how long its runs take).
READ_AHEAD = 0.01

log = structlog.get_logger("flowerpower_daemon.consume")

RunTask = Callable[[Mapping[str, object]], Awaitable[object]]


class StreamConsumer:
    """Runs ``task_name``'s entries from ``messages()`` through ``run`` (its one argument).

    ``messages`` is the broker's ``listen``: entries with their ack (or bare bytes, which
    have none)."""

    def __init__(
        self,
        messages: Callable[[], AsyncGenerator[bytes | AckableMessage, None]],
        run: RunTask,
        *,
        task_name: str,
        concurrency: int,
    ) -> None:
        self.messages = messages
        self.run = run
        self.task_name = task_name
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        #: Runs taken and not yet done with (computing, or their result on its way out).
        self.taken = asyncio.Semaphore(FINISHING * concurrency)
        #: Runs taken and not done with yet.
        self.in_flight = 0
        #: How long a run holds its slot (from its entry to its result), averaged.
        self.slot_time = float("inf")  # none yet: no read ahead

    async def consume(self, finish: asyncio.Event, runs: TaskGroup) -> None:
        """Read entries and start their runs in ``runs`` until ``finish`` is set; raise the
        stream reader's error (Redis gone), the runs going on in ``runs``."""
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                try:
                    await self._read(runs)
                except Exception as exc:
                    failed.append(exc)
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(read, name="stream-reader")
            await finish.wait()
            tg.cancel_scope.cancel()
        if failed:
            raise failed[0]

    def room(self) -> int:
        """Entries a read of the stream may take now: the one the reader is waiting for (its
        slot is held), one per slot free besides (within the ``taken`` bound), and as many
        as its slots will take within ``READ_AHEAD`` at the pace of its recent runs."""
        now = 1 + min(self.slots._value, self.taken._value)
        return now + int(READ_AHEAD * self.concurrency / max(self.slot_time, 1e-6))

    async def drained(self) -> None:
        """Return once no run is in flight (polls: for a stopping worker only)."""
        while self.in_flight:  # noqa: ASYNC110 - a stop, not a hot path
            await anyio.sleep(0.05)

    async def _read(self, runs: TaskGroup) -> None:
        slots, taken = self.slots, self.taken
        async with contextlib.aclosing(self.messages()) as messages:
            while True:
                await taken.acquire()
                try:
                    await slots.acquire()
                except BaseException:
                    taken.release()
                    raise
                try:
                    message = await anext(messages)
                except BaseException:
                    slots.release()
                    taken.release()
                    raise
                self.in_flight += 1
                runs.start_soon(self._one, message)

    async def _one(self, message: bytes | AckableMessage) -> None:
        held = [True]  # the run's slot, given back once (by RUN_COMPUTED or at the end)
        began = time.monotonic()

        def computed() -> None:
            if held:
                held.clear()
                self.slots.release()
                took = time.monotonic() - began
                last = self.slot_time
                self.slot_time = took if last == float("inf") else last + (took - last) / 16

        RUN_COMPUTED.set(computed)  # this task's own context
        try:
            arg = self._argument(message.data if isinstance(message, AckableMessage) else message)
            if arg is not None:
                try:
                    await self.run(arg)
                except Exception:
                    log.exception("run_task_failed")
            if isinstance(message, AckableMessage):
                await _ack(message)
        finally:
            computed()
            self.taken.release()
            self.in_flight -= 1

    def _argument(self, data: bytes | str) -> Mapping[str, object] | None:
        """The run's argument from a stream entry; ``None`` (logged) for one not to run."""
        try:
            body = orjson.loads(data)
            name, args = body["task_name"], body["args"]
            arg = args[0]
            if not isinstance(arg, dict):
                raise TypeError(f"argument 0 is {type(arg).__name__}, not an object")
        except Exception as exc:  # not JSON, not taskiq's shape
            log.warning(
                "stream_message_unreadable",
                error=f"{type(exc).__name__}: {exc}",
                data=bytes(data[:200]) if isinstance(data, bytes) else data[:200],
            )
            return None
        if name != self.task_name:
            log.warning("stream_task_unknown", task_name=str(name), expected=self.task_name)
            return None
        return arg


async def _ack(message: AckableMessage) -> None:
    ack = message.ack
    if ack is not None:
        done = ack()
        if done is not None:
            await done
