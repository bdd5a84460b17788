"""A Sentinel failover under the daemon's Redis clients: they follow the new master."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import anyio
import pytest
from services import (
    RedisSentinelService,
    RedisService,
    require_binary,
)

from flowerpower_daemon.settings import QueueSettings
from flowerpower_daemon.state.dedup import RedisDedupStore, dedup_prefix
from tests.daemon_harness import unique

pytestmark = [pytest.mark.timeout(90)]


def _ask(cli: str, port: int, *command: str) -> str:
    return subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


async def _until(check: Callable[[], bool], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 (polling another process)
            await anyio.sleep(0.2)


async def test_store_follows_a_failover(
    redis_sentinel: RedisSentinelService,
    redis_factory: Callable[..., RedisService],
) -> None:
    cli = require_binary("redis-cli", "redis-tools")
    master = redis_sentinel.master
    replica = redis_factory(
        appendonly=False, overrides={"replicaof": f"{master.host} {master.port}"}
    )
    queue = QueueSettings(
        sentinel={"master": "mymaster", "sentinels": [f"127.0.0.1:{redis_sentinel.port}"]},
        queue_name=unique("q"),
    )
    # The sentinel learns of replicas from the master's INFO, every 10 s.
    await _until(
        lambda: (
            str(replica.port) in _ask(cli, redis_sentinel.port, "sentinel", "replicas", "mymaster")
        ),
        20,
    )
    async with RedisDedupStore(queue.redis, dedup_prefix(queue)) as store:
        assert await store.claim("before", "run-1", 600) == ("new", None)
        # The replica has it (WAIT: the write reached one replica) before the master dies.
        assert await store._redis.wait(1, 5000) == 1
        await master.akill()
        # down-after 1 s, then the sentinel promotes the replica
        await _until(lambda: _ask(cli, replica.port, "role").startswith("master"), 30)
        with anyio.fail_after(15):
            while True:
                try:
                    claimed = await store.claim("after", "run-2", 600)
                    break
                except Exception:  # the old master's connection: the next one asks the sentinel
                    await anyio.sleep(0.2)
        assert claimed == ("new", None)
        assert await store.claim("before", "run-3", 600) == ("running", None)
