"""taskiq-redis's stream broker with reclaim that a worker can rely on (imported only for Redis).

taskiq-redis 1.2's ``RedisStreamBroker.listen`` looks for messages another
consumer left unacknowledged (``XAUTOCLAIM`` after ``idle_timeout``) only
after a read returned new messages: on an idle stream the run of a dead
worker waited for the next message. And a live worker's own run that takes
longer than ``idle_timeout`` was reclaimed by another worker and ran twice
at once. Here the read loop also reclaims, on an idle stream as on a busy
one, at most every second (a quarter of ``idle_timeout`` when that is
shorter: nothing becomes claimable sooner), and :meth:`ReclaimingStreamBroker.keep_claimed` (run by
``flowerpower-daemon worker``) resets the idle time of everything this
consumer holds, every third of ``idle_timeout``: only a worker that stopped
loses its runs. A worker's acks go out with its other Redis writes
(:attr:`Reclaiming.write_batch`, :mod:`..state.batch`), several ids per
``XACK``, and the messages this consumer reclaims are remembered
(:meth:`Reclaiming.first_delivery`), so that only their starts read the run
ledger.

:class:`WorkerPresence` is the live workers' listing (``flowerpowerctl
status``): each worker keeps a hash of its name, runs in flight, runs done
and last beat, with an expiry, and its name in an index; the daemon reads
the fresh ones. Keys carry the queue name as a hash tag (``{queue}:...``),
so that they share a Redis Cluster slot.

The same on a Sentinel-managed master (:class:`ReclaimingSentinelStreamBroker`,
over taskiq-redis's ``RedisStreamSentinelBroker``) and on a Redis Cluster
(:class:`ReclaimingClusterStreamBroker`, over ``RedisStreamClusterBroker``):
taskiq-redis 1.2's versions of those never reclaim at all (no
``XAUTOCLAIM``, no ``idle_timeout``); here they share this module's
reclaim, heartbeat and ack handling (:class:`Reclaiming`), and take their
clients from :mod:`flowerpower_daemon.state.stores` (one long-lived master
client that follows a failover, instead of taskiq's new client per command).
The stream is one key, so every stream command goes to one Cluster node.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from datetime import UTC, datetime
from typing import Any, NoReturn, TypedDict

import anyio
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from taskiq import AckableMessage, AsyncBroker
from taskiq_redis import RedisStreamBroker, RedisStreamClusterBroker, RedisStreamSentinelBroker

from ..settings import RedisTarget
from ..state.batch import WriteBatch
from ..state.stores import RedisStore, cluster_for, sentinel_for

__all__ = [
    "Reclaiming",
    "ReclaimingClusterStreamBroker",
    "ReclaimingSentinelStreamBroker",
    "ReclaimingStreamBroker",
    "WorkerBeat",
    "WorkerPresence",
    "hash_tagged",
]

log = structlog.get_logger("flowerpower_daemon.streams")

_ACK_TRIES = 5  # over about 2 s


class Reclaiming(AsyncBroker):
    """Reclaim, heartbeat and acks of a stream broker; :meth:`_connection` lends a client."""

    queue_name: str
    consumer_group_name: str
    consumer_name: str
    block: int
    count: int | None
    idle_timeout: int
    unacknowledged_batch_size: int

    def _connection(self) -> AbstractAsyncContextManager[Any]:
        """A client for one use (``async with``); ``Any``: redis-py's stream replies are untyped."""
        raise NotImplementedError

    #: Set by a stopping worker before it cancels the runs still going at its deadline:
    #: taskiq acks a cancelled task like a failed one, which would lose the run; with
    #: acks withheld its message stays in the stream and another worker reclaims it.
    withhold_acks = False
    #: Called once this consumer is in the consumer group, as it starts reading the
    #: stream (a worker tells systemd READY=1 then).
    on_listening: Callable[[], object] | None = None

    #: Set by a worker: acks go out with its other writes, several in one ``XACK``.
    write_batch: WriteBatch | None = None
    #: Set by a worker: how many entries one read may take, the runs it has room to start
    #: soon (at most ``count``). Entries read are this consumer's until it acks them:
    #: read past its room, they would wait for its slots while another worker idles.
    read_count: Callable[[], int] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Task ids (run ids) of the messages reclaimed from another consumer, not yet run.
        self.reclaimed: set[str] = set()

    def _read_count(self) -> int | None:
        """Entries one read may take: the worker's room, within ``count``."""
        if self.read_count is None:
            return self.count
        room = self.read_count()
        return room if self.count is None else min(room, self.count)

    def first_delivery(self, task_id: str) -> bool:
        """Whether ``task_id``'s message came fresh from the stream (not reclaimed); once."""
        reclaimed = self.reclaimed
        if task_id in reclaimed:
            reclaimed.discard(task_id)
            return False
        return True

    def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            async with self._connection() as conn:
                await conn.xack(queue_name, self.consumer_group_name, id)

        async def guarded() -> None:
            if self.withhold_acks:
                log.info("run_left_in_stream", message_id=_text(id))
                return
            if self.write_batch is not None:  # sent with the next writes, tried again there
                self.write_batch.ack(queue_name, self.consumer_group_name, id)
                return
            # XACK is idempotent: a connection lost to a Redis restart is tried again
            # (an ack that never lands leaves a finished run to be run again elsewhere).
            for attempt in range(1, _ACK_TRIES + 1):
                try:
                    await ack()
                    return
                except (RedisConnectionError, OSError) as exc:
                    if attempt == _ACK_TRIES:
                        raise
                    log.warning("stream_ack_failed", message_id=_text(id), error=str(exc))
                    await anyio.sleep(0.2 * attempt)

        return guarded

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        conn: Any  # redis-py types the stream commands' replies too loosely to unpack
        async with self._connection() as conn:
            # Joined explicitly: a blocking XREADGROUP on an empty stream does not list the
            # consumer (Redis 7.0), and "consuming" should mean "a member of the group".
            try:
                await conn.xgroup_createconsumer(
                    self.queue_name, self.consumer_group_name, self.consumer_name
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis restarted without persistence: stream and group are gone. Runs the
                # daemon enqueued since then are in a new stream: the group reads it from 0.
                log.warning("stream_group_recreated", stream=self.queue_name)
                await conn.xgroup_create(
                    self.queue_name, self.consumer_group_name, id="0", mkstream=True
                )
                await conn.xgroup_createconsumer(
                    self.queue_name, self.consumer_group_name, self.consumer_name
                )
            if self.on_listening is not None:
                listening, self.on_listening = self.on_listening, None
                listening()
            reclaim_at = 0.0
            while True:
                fetched = await conn.xreadgroup(
                    self.consumer_group_name,
                    self.consumer_name,
                    {self.queue_name: ">"},
                    block=self.block,
                    noack=False,
                    count=self._read_count(),
                )
                for stream, messages in fetched or ():
                    for msg_id, msg in messages:
                        yield AckableMessage(
                            data=msg[b"data"], ack=self._ack_generator(msg_id, stream)
                        )
                # A run is claimable only after idle_timeout: looking after every read (a
                # round trip per message when they come one by one) finds nothing sooner.
                now = time.monotonic()
                if now < reclaim_at:
                    continue
                reclaim_at = now + min(1.0, self.idle_timeout / 4000)
                reply = await conn.xautoclaim(
                    self.queue_name,
                    self.consumer_group_name,
                    self.consumer_name,
                    min_idle_time=self.idle_timeout,
                    count=self.unacknowledged_batch_size,
                )
                if len(reply[1]) >= self.unacknowledged_batch_size:
                    reclaim_at = 0.0  # more may be waiting
                for msg_id, msg in reply[1]:
                    if not msg or b"data" not in msg:
                        # Deleted from the stream meanwhile: nothing left to run. Acked, so
                        # that it leaves the pending list (where it would pin the trim).
                        await conn.xack(self.queue_name, self.consumer_group_name, msg_id)
                        continue
                    log.warning("run_reclaimed", message_id=_text(msg_id))
                    with suppress(ValueError, KeyError, TypeError):
                        self.reclaimed.add(str(orjson.loads(msg[b"data"])["task_id"]))
                    yield AckableMessage(
                        data=msg[b"data"], ack=self._ack_generator(msg_id, self.queue_name)
                    )

    async def keep_claimed(self) -> NoReturn:
        """Reset the idle time of this consumer's unacknowledged messages, forever."""
        interval = max(0.05, self.idle_timeout / 3000)
        conn: Any  # redis-py types the stream commands' replies too loosely to unpack
        async with self._connection() as conn:
            while True:
                await anyio.sleep(interval)
                try:
                    pending = await conn.xpending_range(
                        self.queue_name,
                        self.consumer_group_name,
                        min="-",
                        max="+",
                        count=10_000,
                        consumername=self.consumer_name,
                    )
                    ids = [p["message_id"] for p in pending]
                    if ids:
                        await conn.xclaim(
                            self.queue_name,
                            self.consumer_group_name,
                            self.consumer_name,
                            min_idle_time=0,
                            message_ids=ids,
                            justid=True,
                        )
                    await self._trim(conn)
                except Exception as exc:  # redis.RedisError, OSError: try again next round
                    log.warning("stream_heartbeat_failed", error=str(exc))

    async def _trim(self, conn: Any) -> None:
        """Drop the entries every consumer group of the stream has read and acknowledged.

        Nothing else removes them (taskiq-redis sets no MAXLEN, and a MAXLEN could drop
        runs not yet read): the stream grew by one entry per run for good. An entry
        older than a group's oldest unacknowledged one, or than its last delivered one
        when none is pending, is done with; the oldest such mark of all groups is kept.
        """
        marks: list[tuple[int, int]] = []
        for group in await conn.xinfo_groups(self.queue_name):
            summary = await conn.xpending(self.queue_name, group["name"])
            mark = summary["min"] if summary["pending"] else group["last-delivered-id"]
            marks.append(_stream_id(_text(mark)))
        if marks and min(marks) > (0, 0):
            ms, seq = min(marks)
            await conn.xtrim(self.queue_name, minid=f"{ms}-{seq}", approximate=False)


class ReclaimingStreamBroker(Reclaiming, RedisStreamBroker):
    """One stream on one Redis server, one consumer group; reclaims on every read round.

    Its commands go through one client over the broker's pool: taskiq-redis makes
    a client per command (``kick`` and ack), about 40 us of CPU each here. The
    daemon does not ``kick``: it writes the stream itself (:mod:`.enqueue`);
    taskiq-redis's own ``kick`` stays for any other kicker.
    """

    _client: Redis | None = None

    def _connection(self) -> AbstractAsyncContextManager[Any]:
        client = self._client
        if client is None:
            client = self._client = Redis(connection_pool=self.connection_pool)
        return nullcontext(client)  # the pool is the broker's: shutdown closes it


class ReclaimingSentinelStreamBroker(Reclaiming, RedisStreamSentinelBroker):
    """The stream on the master that Redis Sentinel names; one client that follows failovers."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        queue_name: str,
        consumer_group_name: str,
        idle_timeout: int,
        xread_block: int,
        unacknowledged_batch_size: int = 100,
        xread_count: int | None = 100,
    ) -> None:
        super().__init__(
            sentinels=list(target.nodes),
            master_name=target.master,
            queue_name=queue_name,
            consumer_group_name=consumer_group_name,
            xread_block=xread_block,
        )
        self.sentinel = sentinel_for(target)
        self.idle_timeout = idle_timeout
        self.unacknowledged_batch_size = unacknowledged_batch_size
        self.count = xread_count
        self._master: Redis | None = None

    @asynccontextmanager
    async def _acquire_master_conn(self) -> AsyncIterator[Redis]:
        # taskiq-redis makes a client (a pool, a master lookup, a connection) per command.
        if self._master is None:
            self._master = self.sentinel.master_for(self.master_name)
        yield self._master

    def _connection(self) -> AbstractAsyncContextManager[Any]:
        return self._acquire_master_conn()

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._master is not None:
            await self._master.aclose()
            self._master = None
        for node in self.sentinel.sentinels:
            await node.aclose()


class ReclaimingClusterStreamBroker(Reclaiming, RedisStreamClusterBroker):
    """The stream on a Redis Cluster (one key: one node serves it); one cluster client."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        queue_name: str,
        consumer_group_name: str,
        idle_timeout: int,
        xread_block: int,
        unacknowledged_batch_size: int = 100,
        xread_count: int | None = 100,
    ) -> None:
        super().__init__(
            target.url,
            queue_name=queue_name,
            consumer_group_name=consumer_group_name,
            xread_block=xread_block,
        )
        self.redis = cluster_for(target)  # every start-up node, not only the URL's
        self.idle_timeout = idle_timeout
        self.unacknowledged_batch_size = unacknowledged_batch_size
        self.count = xread_count

    def _connection(self) -> AbstractAsyncContextManager[Any]:
        return nullcontext(self.redis)  # shared; closed by shutdown


def _stream_id(text: str) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<seq>"`` as a tuple that orders like the ids."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def hash_tagged(queue_name: str) -> str:
    """``queue_name`` as a Redis Cluster hash tag: ``{name}``, or as is when it has one."""
    start = queue_name.find("{")
    if start != -1 and queue_name.find("}", start + 2) != -1:
        return queue_name
    return f"{{{queue_name}}}"


class WorkerBeat(TypedDict):
    """One live worker, as ``status`` lists it."""

    name: str
    in_flight: int
    done: int
    concurrency: int
    started_at: str
    last_seen: str
    age_s: float


class WorkerPresence(RedisStore):
    """The live workers of one queue: a hash per worker (with an expiry) plus an index.

    ``{queue}:worker:<name>`` holds the worker's fields and expires ``ttl``
    seconds after its last beat; ``{queue}:workers`` (a sorted set, score: the
    last beat) names them, stale entries pruned on each beat and read. A
    worker that stops leaves (:meth:`leave`); one that died drops out after ``ttl``.
    """

    def __init__(self, url: RedisTarget | str, queue_name: str, *, ttl: float = 10.0) -> None:
        self.url = url
        self.prefix = hash_tagged(queue_name)
        self.ttl = ttl

    def _key(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    async def beat(
        self, name: str, *, in_flight: int, done: int, concurrency: int, started_at: str
    ) -> None:
        """Record this worker as alive now; a Redis error is logged (the next beat retries)."""
        now = time.time()
        index = f"{self.prefix}:workers"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._key(name),
                    mapping={
                        "name": name,
                        "in_flight": in_flight,
                        "done": done,
                        "concurrency": concurrency,
                        "started_at": started_at,
                        "last_seen": repr(now),
                    },
                )
                pipe.expire(self._key(name), max(1, int(self.ttl)))
                pipe.zadd(index, {name: now})
                pipe.zremrangebyscore(index, "-inf", now - self.ttl)
                pipe.expire(index, max(1, int(self.ttl)))
                await pipe.execute()
        except Exception as exc:  # redis.RedisError, OSError ...
            log.warning("worker_beat_failed", error=str(exc))

    async def leave(self, name: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(name))
                pipe.zrem(f"{self.prefix}:workers", name)
                await pipe.execute()
        except Exception as exc:
            log.warning("worker_beat_failed", error=str(exc))

    async def live(self) -> list[WorkerBeat]:
        """The workers seen within ``ttl``, by name (raises the Redis error)."""
        now = time.time()
        names = await self._redis.zrangebyscore(f"{self.prefix}:workers", now - self.ttl, "+inf")
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._key(_text(name)))
            rows: list[dict[bytes, bytes]] = await pipe.execute()
        out: list[WorkerBeat] = []
        for row in rows:
            if not row:
                continue  # expired meanwhile
            f = {_text(k): _text(v) for k, v in row.items()}
            try:
                seen = float(f["last_seen"])
                out.append(
                    {
                        "name": f["name"],
                        "in_flight": int(f["in_flight"]),
                        "done": int(f["done"]),
                        "concurrency": int(f.get("concurrency", "0")),
                        "started_at": f.get("started_at", ""),
                        "last_seen": datetime.fromtimestamp(seen, UTC).isoformat(),
                        "age_s": round(max(0.0, now - seen), 3),
                    }
                )
            except (KeyError, ValueError):
                continue  # written by something else
        return sorted(out, key=lambda w: w["name"])
