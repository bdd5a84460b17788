"""The stream brokers and stores on each Redis topology, against real servers.

On a 3-node Cluster, through a Sentinel and over TLS: a run a consumer holds
is kept by its heartbeat (``keep_claimed``) and reclaimed by another consumer
once the heartbeat stops (taskiq-redis's own Sentinel and Cluster stream
brokers never reclaim); the dedup store's Lua scripts, the tick lock, the
run ledger and the history's ``MULTI``/``MGET`` work there.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest
from services import (
    RedisClusterNodes,
    RedisSentinelService,
    RedisTlsService,
)
from taskiq import AckableMessage
from taskiq.message import BrokerMessage

from flowerpower_daemon.project.models import ErrorInfo, RunRequest, RunResult
from flowerpower_daemon.queue.broker import RunLedger, create_broker
from flowerpower_daemon.queue.streams import Reclaiming
from flowerpower_daemon.settings import QueueSettings, Settings
from flowerpower_daemon.state.dedup import RedisDedupStore, dedup_prefix
from flowerpower_daemon.state.history import history_for
from flowerpower_daemon.state.timerstate import timer_state_for
from tests.daemon_harness import unique

pytestmark = [pytest.mark.timeout(60)]


async def _next(broker: Reclaiming, timeout: float) -> AckableMessage | None:
    gen = broker.listen()
    try:
        with anyio.move_on_after(timeout):
            return await gen.__anext__()
        return None
    finally:
        await gen.aclose()


async def _streams_and_stores(queue: QueueSettings) -> None:
    one, two = create_broker(queue, worker=True), create_broker(queue, worker=True)
    assert isinstance(one, Reclaiming) and isinstance(two, Reclaiming)
    await one.startup()
    await two.startup()
    try:
        await one.kick(BrokerMessage(task_id="t1", task_name="x", message=b"hello", labels={}))
        held = await _next(one, 10)
        assert held is not None and held.data == b"hello"
        async with anyio.create_task_group() as tg:
            tg.start_soon(one.keep_claimed)
            # Idle far beyond reclaim_after, but its consumer is alive: nobody takes it.
            assert await _next(two, 1.5) is None
            tg.cancel_scope.cancel()
        taken = await _next(two, 10)  # the heartbeat stopped: the other consumer reclaims it
        assert taken is not None and taken.data == b"hello"
        await taken.ack()
        assert await _next(one, 1.0) is None  # acked: gone for everyone
    finally:
        await one.shutdown()
        await two.shutdown()

    settings = Settings(queue=queue, triggers=[])
    async with RedisDedupStore(queue.redis, dedup_prefix(queue)) as dedup:
        assert await dedup.claim("k", "run-1", 60) == ("new", None)
        assert await dedup.claim("k", "run-2", 60) == ("running", None)
        await dedup.complete("k", b"{}")
        assert await dedup.claim("k", "run-3", 60) == ("done", b"{}")
    async with RunLedger(queue.redis, f"{queue.queue_name}:started", who="w1") as ledger:
        assert (await ledger.started("r1"))[0] == []
        earlier, _ = await ledger.started("r1")
        assert [who for _, who in earlier] == ["w1"]
        await ledger.finished("r1")
    fire = datetime.now(UTC).replace(microsecond=0)
    async with timer_state_for(settings) as first, timer_state_for(settings) as second:
        assert await first.claim("tick", fire, 60) is True
        assert await second.claim("tick", fire, 60) is False
        await first.record("tick", fire)
        assert await second.last_fire("tick") == fire
    request = RunRequest(pipeline="p", run_id=unique("run"))
    async with history_for(settings) as history:
        error = ErrorInfo("Boom", "boom", None, False)
        await history.record(RunResult.not_run(request, "failed", error))
        assert history.recorded == 1
        assert [j["run_id"] for j in await history.recent()] == [request.run_id]


async def test_cluster_streams_and_stores(
    redis_cluster: RedisClusterNodes,
) -> None:
    await _streams_and_stores(
        QueueSettings(broker=redis_cluster.url, queue_name=unique("q"), reclaim_after=0.3)
    )


async def test_sentinel_url_streams_and_stores(
    redis_sentinel: RedisSentinelService,
) -> None:
    await _streams_and_stores(
        QueueSettings(broker=redis_sentinel.url, queue_name=unique("q"), reclaim_after=0.3)
    )


async def test_tls_streams_and_stores(
    redis_tls: RedisTlsService,
) -> None:
    broker = f"{redis_tls.url}?ssl_ca_certs={redis_tls.ca_file}&ssl_cert_reqs=required"
    await _streams_and_stores(
        QueueSettings(broker=broker, queue_name=unique("q"), reclaim_after=0.3)
    )
