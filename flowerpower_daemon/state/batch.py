"""Group commit of a worker's Redis writes: one round trip carries every write queued meanwhile.

A worker's run costs several small writes: the start note of the run ledger
before it runs, then the history entry, the end of the ledger note and the
stream ``XACK`` after it. Each one alone is a round trip, and redis-py spends
far more CPU per command sent and parsed on its own (a pool checkout, a
write, a read, a parse) than per command in a pipeline. :class:`WriteBatch`
queues them and one task sends whatever is queued as one pipeline, then
whatever came in while that was under way, and so on: under load several
runs' writes share a round trip. A write someone waits for (:meth:`WriteBatch.submit`,
:meth:`WriteBatch.sent`) goes at the next turn of the event loop; the others
wait up to ``linger`` (5 ms) for one to go with.

Only a run's start note is waited for (the run must not start before it is
noted). Its history entry, the end of its note and its ack are not: the
slot the run held is free at once, so the next run's start note shares the
round trip with them (one round trip per run, under load and with a trickle of
runs alike). An ack that is
not sent yet when the worker dies leaves the run in the stream, to run again
elsewhere (at least once, as when the worker dies mid-run); a worker that
stops sends what is queued before it closes its client.

On one server (or a Sentinel master) the batch does not go through
redis-py's ``Pipeline`` (its command stack, per-command reply callbacks,
connection checkout and reset cost more CPU than the commands): the stages
write into a collector of redis-py's commands, packed by a packer of
ours (the same bytes, without redis-py's per-argument checks), and go out on
one pooled connection, each reply parsed as redis-py's pipeline parses it
(its retry and reconnect kept). A write only needs to have *left* the process
when it is a run's start note (:meth:`WriteBatch.sent`): a worker killed
after that point still gets its note into Redis, since the kernel sends
what is in a closed socket's buffer. So such a waiter is woken as soon as
the batch is written and nothing of it is left in the process's own
buffer, without waiting for the reply (on a Cluster, after the reply).

Writes keep their order (a run's history entry and ledger clean-up go out
before its ``XACK``, so an acknowledged run is recorded); acks of one stream
queued together become one ``XACK`` with all their ids, after the other
writes of the batch. The pipeline is not a transaction (a Redis Cluster
pipeline may span nodes), with one exception on one server: a batch of
several ``XADD`` commands (the daemon's enqueues) goes in ``MULTI``/``EXEC``.
Redis hands new entries to the workers blocked in ``XREADGROUP`` after
each command, so a plain pipeline of ten of them wakes a worker per
entry; in a transaction they are handed out after ``EXEC``, together, each
worker taking as many as it has room for (:attr:`~..queue.streams.Reclaiming.read_count`).
A worker woken for several runs pays its wake-up once: with three workers
sharing two cores, 0.61 -> 0.48-0.63 ms of worker CPU per run (``bench/fleet.py``).

A batch that fails as a whole (the connection) fails each waiting write
and logs each unawaited one; its acks are tried again (``XACK`` is
idempotent) up to ``ACK_TRIES`` times, a little later each time, then
logged (the run will run again elsewhere).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Union, cast

import anyio
import structlog
from anyio.abc import TaskStatus

from ..settings import RedisTarget
from .stores import ClientOptions, RedisStore

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline
    from redis.asyncio.cluster import ClusterPipeline

__all__ = ["Replies", "Stage", "WriteBatch", "WritePipeline"]

log = structlog.get_logger("flowerpower_daemon.batch")

#: What a stage writes into: a one-server (or Sentinel master) pipeline or a Cluster's.
WritePipeline = Union["Pipeline", "ClusterPipeline"]
#: Queues one write's commands on the pipeline.
Stage = Callable[[WritePipeline], object]
#: The replies to one stage's commands (an exception object for a command that failed).
Replies = list[Any]

#: A stream entry id as redis-py returns it.
MessageId = bytes | str

#: At most this many stages go in one pipeline (the rest take the next round trip).
MAX_BATCH = 500
#: Turns of the event loop a woken batch waits before it is sent: the next run's start
#: note, queued a few turns after the previous run's ack frees its slot, goes along.
SETTLE_TURNS = 3
#: Longest writes nobody waits for stay queued for company (a next run's start note):
#: a worker that runs a trickle would otherwise send each run's trailing writes (history,
#: ledger clean-up, ack) in round trips of their own, two or three per run.
LINGER = 0.005
#: Longest a batch's round trip may take. The client has no per-reply socket timeout
#: (redis-py's default arms and cancels a timer per reply: about a third of the CPU
#: of a small pipeline); this one bounds the whole batch instead.
TIMEOUT = 10.0
#: Sends of one ack before it is given up (0.2 s, 0.4 s ... apart: about 2 s in all).
ACK_TRIES = 5

_Acks = dict[tuple[str, str], list[tuple[MessageId, int]]]


class _Item:
    __slots__ = ("done", "event", "future", "sent", "stage")

    def __init__(
        self,
        stage: Stage,
        future: asyncio.Future[Replies] | None,
        event: str,
        done: Callable[[Replies], object] | None,
        sent: asyncio.Future[None] | None = None,
    ) -> None:
        self.stage = stage
        self.future = future
        self.event = event
        self.done = done
        self.sent = sent


class WriteBatch(RedisStore):
    """Writes queued by :meth:`submit`, :meth:`send` and :meth:`ack`, sent by :meth:`run`.

    Open it (``async with``: leaving sends what is still queued, bounded) and
    run :meth:`run` in a task group; it has its own client of ``url``
    (``queue.broker``).
    """

    client_options: ClassVar[ClientOptions] = {"socket_timeout": None}

    def __init__(
        self,
        url: RedisTarget | str,
        *,
        max_batch: int = MAX_BATCH,
        timeout: float = TIMEOUT,
        linger: float = LINGER,
    ) -> None:
        self.url = url
        self.max_batch = max_batch
        self.timeout = timeout
        self.linger = linger
        self._items: list[_Item] = []
        self._acks: _Acks = {}  # (stream, group) -> (message id, sends so far)
        self._retry_in = 0.0  # a failed batch's acks wait this long before the next send
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # a queued write is waited for (submit, sent)
        #: Round trips made and writes they carried (the worker logs them when it stops).
        self.round_trips = 0
        self.writes = 0

    def submit(self, stage: Stage) -> asyncio.Future[Replies]:
        """Queue ``stage``; the future gets its replies (or the batch's error): await it."""
        future: asyncio.Future[Replies] = asyncio.get_running_loop().create_future()
        self._items.append(_Item(stage, future, "", None))
        self._urgent.set()
        self._wake.set()
        return future

    def send(
        self, stage: Stage, event: str, done: Callable[[Replies], object] | None = None
    ) -> None:
        """Queue ``stage`` unawaited; a failure is logged as ``event``, else ``done(replies)``."""
        self._items.append(_Item(stage, None, event, done))
        self._wake.set()

    def sent(self, stage: Stage, event: str) -> asyncio.Future[None]:
        """Queue ``stage``; the future is done once its commands have left the process (see
        the module's docstring) or failed (logged as ``event``): it never raises."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append(_Item(stage, None, event, None, future))
        self._urgent.set()
        self._wake.set()
        return future

    def ack(self, stream: str, group: str, message_id: MessageId) -> None:
        """Queue an ``XACK`` of ``message_id`` (unawaited; merged with the batch's other acks)."""
        self._acks.setdefault((stream, group), []).append((message_id, 0))
        self._wake.set()

    @property
    def pending(self) -> int:
        """Writes queued and not sent yet."""
        return len(self._items) + sum(len(ids) for ids in self._acks.values())

    async def __aexit__(self, *exc: object) -> None:
        """Send what is still queued (bounded), then close the client."""
        with anyio.move_on_after(5, shield=True):
            while self.pending:
                if self._retry_in:
                    await anyio.sleep(self._retry_in)
                await self.flush()
        if self.pending:
            log.error("redis_writes_dropped", writes=self.pending)
        await super().__aexit__(*exc)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send queued writes, a pipeline at a time, until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._retry_in:
                await anyio.sleep(self._retry_in)
            if not self._urgent.is_set() and self.linger > 0:
                # Nobody waits for these writes (a finished run's history, ack, ledger
                # clean-up): they go with the next run's start note, or after ``linger``.
                try:
                    async with asyncio.timeout(self.linger):
                        await self._urgent.wait()
                except TimeoutError:
                    pass
            for _ in range(SETTLE_TURNS):
                await asyncio.sleep(0)
            await self.flush()

    async def flush(self) -> None:
        """Send what is queued now (the rest of a long queue wakes :meth:`run` again)."""
        items, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
        acks, self._acks = self._acks, {}
        self._urgent.clear()
        if any(item.future is not None or item.sent is not None for item in self._items):
            self._urgent.set()  # past max_batch: still waited for
        self._retry_in = 0.0
        if self._items:
            self._wake.set()
        if not items and not acks:
            return
        spans: list[tuple[int, int]] = []
        try:
            # asyncio's timeout: one timer; anyio's cancel scope costs several times more.
            async with asyncio.timeout(self.timeout):
                replies = await self._execute(items, acks, spans)
        except Exception as exc:
            self._fail(items, exc)
            self._again(acks, exc)
            return
        except BaseException:  # cancelled (the worker stops): __aexit__ sends them again
            _wake_sent(items)
            self._items[:0] = [item for item in items if item.future is None]
            for key, ids in acks.items():
                self._acks.setdefault(key, [])[:0] = ids
            for item in items:
                if item.future is not None:
                    item.future.cancel()
            raise
        _wake_sent(items)  # on a Cluster only now (one server: once the bytes were out)
        for item, (start, end) in zip(items, spans, strict=True):
            self._settle(item, replies[start:end])
        ack_replies = replies[len(replies) - len(acks) :]
        for (key, ids), reply in zip(acks.items(), ack_replies, strict=True):
            if isinstance(reply, Exception):
                self._again({key: ids}, reply)

    async def _execute(
        self, items: Sequence[_Item], acks: _Acks, spans: list[tuple[int, int]]
    ) -> Replies:
        """One pipeline: the stages in order, then one ``XACK`` per stream; every reply."""
        self.round_trips += 1
        self.writes += len(items) + sum(len(ids) for ids in acks.values())
        from redis.asyncio.cluster import RedisCluster  # imported once the batch sends

        from ._commands import Commands, send_and_read

        redis = self._redis
        if isinstance(redis, RedisCluster):
            async with redis.pipeline(transaction=False) as pipe:
                _stack(pipe, items, acks, spans)
                replies: Replies = await pipe.execute(raise_on_error=False)
                return replies
        commands = Commands()
        # Typed as a pipeline for the stages: they call only the builders the two share.
        _stack(cast("Pipeline", commands), items, acks, spans)
        pool = redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        stack = commands.stack
        transaction = sum(1 for args, _ in stack if args[0] == "XADD") > 1
        try:
            replies = await conn.retry.call_with_retry(
                lambda: send_and_read(
                    redis, conn, stack, partial(_wake_sent, items), transaction=transaction
                ),
                lambda _error: conn.disconnect(),
            )
        except BaseException:  # its replies are half read: the connection is of no more use
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)
        return replies

    def _settle(self, item: _Item, replies: Replies) -> None:
        future = item.future
        if future is not None:
            if not future.done():
                future.set_result(replies)
            return
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            log.error(item.event, error=str(failed[0]))
        elif item.done is not None:
            try:
                item.done(replies)
            except Exception as exc:  # a follow-up's bug must not stop the batch
                log.error(item.event, error=repr(exc))

    def _fail(self, items: Sequence[_Item], exc: Exception) -> None:
        _wake_sent(items)
        for item in items:
            if item.future is None:
                log.error(item.event, error=str(exc))
            elif not item.future.done():
                item.future.set_exception(exc)

    def _again(self, acks: _Acks, exc: Exception) -> None:
        """Queue failed acks again, a little later; give up on those sent ``ACK_TRIES`` times."""
        tries = 0
        for key, ids in acks.items():
            for message_id, sent in ids:
                if sent + 1 >= ACK_TRIES:
                    log.error("stream_ack_failed", message_id=_text(message_id), error=str(exc))
                    continue
                self._acks.setdefault(key, []).append((message_id, sent + 1))
                tries = max(tries, sent + 1)
        if tries:
            log.warning("stream_ack_failed", error=str(exc), retry_in_s=0.2 * tries)
            self._retry_in = 0.2 * tries
            self._wake.set()


def _stack(
    pipe: WritePipeline, items: Sequence[_Item], acks: _Acks, spans: list[tuple[int, int]]
) -> None:
    """Queue the stages on ``pipe`` in order, then one ``XACK`` per stream."""
    for item in items:
        start = len(pipe)
        item.stage(pipe)
        spans.append((start, len(pipe)))
    for (stream, group), ids in acks.items():
        pipe.execute_command("XACK", stream, group, *(message_id for message_id, _ in ids))


def _wake_sent(items: Sequence[_Item]) -> None:
    for item in items:
        if item.sent is not None and not item.sent.done():
            item.sent.set_result(None)


def _text(value: MessageId) -> str:
    return value.decode() if isinstance(value, bytes) else value
