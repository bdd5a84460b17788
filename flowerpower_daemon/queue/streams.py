"""taskiq-redis's stream broker with reclaim that a worker can rely on (imported only for Redis).

taskiq-redis 1.2's ``RedisStreamBroker.listen`` looks for messages another
consumer left unacknowledged (``XAUTOCLAIM`` after ``idle_timeout``) only
after a read returned new messages: on an idle stream the run of a dead
worker waited for the next message. And a live worker's own run that takes
longer than ``idle_timeout`` was reclaimed by another worker and ran twice
at once. Here every read round (at most ``xread_block`` apart) also
reclaims, and :meth:`ReclaimingStreamBroker.keep_claimed` (run by
``flowerpower-daemon worker``) resets the idle time of everything this
consumer holds, every third of ``idle_timeout``: only a worker that stopped
loses its runs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from taskiq import AckableMessage
from taskiq_redis import RedisStreamBroker

__all__ = ["ReclaimingStreamBroker"]

log = structlog.get_logger("flowerpower_daemon.streams")

_ACK_TRIES = 5  # over about 2 s


class ReclaimingStreamBroker(RedisStreamBroker):
    """One stream, one consumer group; reclaims on every read round; see the module doc."""

    #: Set by a stopping worker before it cancels the runs still going at its deadline:
    #: taskiq acks a cancelled task like a failed one, which would lose the run; with
    #: acks withheld its message stays in the stream and another worker reclaims it.
    withhold_acks = False

    def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Awaitable[None]]:
        ack = super()._ack_generator(id, queue_name)

        async def guarded() -> None:
            if self.withhold_acks:
                log.info("run_left_in_stream", message_id=_text(id))
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
        async with Redis(connection_pool=self.connection_pool) as conn:
            while True:
                fetched = await conn.xreadgroup(
                    self.consumer_group_name,
                    self.consumer_name,
                    {self.queue_name: ">"},
                    block=self.block,
                    noack=False,
                    count=self.count,
                )
                for stream, messages in fetched or ():
                    for msg_id, msg in messages:
                        yield AckableMessage(
                            data=msg[b"data"], ack=self._ack_generator(msg_id, stream)
                        )
                reply = await conn.xautoclaim(
                    self.queue_name,
                    self.consumer_group_name,
                    self.consumer_name,
                    min_idle_time=self.idle_timeout,
                    count=self.unacknowledged_batch_size,
                )
                for msg_id, msg in reply[1]:
                    if not msg or b"data" not in msg:
                        continue  # trimmed from the stream meanwhile: nothing left to run
                    log.warning("run_reclaimed", message_id=_text(msg_id))
                    yield AckableMessage(
                        data=msg[b"data"], ack=self._ack_generator(msg_id, self.queue_name)
                    )

    async def keep_claimed(self) -> NoReturn:
        """Reset the idle time of this consumer's unacknowledged messages, forever."""
        interval = max(0.05, self.idle_timeout / 3000)
        conn: Any  # redis-py types the stream commands' replies too loosely to unpack
        async with Redis(connection_pool=self.connection_pool) as conn:
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
                except Exception as exc:  # redis.RedisError, OSError: try again next round
                    log.warning("stream_heartbeat_failed", error=str(exc))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
