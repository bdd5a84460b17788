"""Redis mode keeps Redis bounded: finished runs leave the stream, taskiq stores no results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from tests.daemon_harness import configure, mqtt_trigger, online_daemon, unique

pytestmark = pytest.mark.timeout(180)


async def test_acknowledged_runs_are_trimmed_from_the_stream(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """After 30 runs through a worker the stream holds none of them, and no result keys."""
    prefix = unique("trim")
    queue = unique("q")
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")],
        queue={"broker": redis_server.url, "queue_name": queue, "reclaim_after": 3},
    )
    r = redis.Redis.from_url(redis_server.url)
    async with online_daemon(config, subscribe=[config.results], workers=1) as d:
        for i in range(30):
            await d.client.publish(f"{prefix}/dev{i}", b'{"temperature": 12}', qos=1)
        results = await d.collect(config.results, 30, 60)
        assert r.xlen(queue) >= 1  # the runs went through the stream
        with anyio.fail_after(30):  # the worker trims at every heartbeat (1 s here)
            while r.xlen(queue) > 1:  # noqa: ASYNC110 (polling Redis, no event to wait on)
                await anyio.sleep(0.2)
    assert all(m.data["status"] == "success" for m in results)
    # Nothing of taskiq's result backend: results go out on MQTT and into the history.
    # (taskiq-redis keys a result by its task id, which is the run id here.)
    assert not any(r.exists(m.data["run_id"]) for m in results)


async def test_worker_recreates_its_group_after_redis_lost_everything(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A Redis without persistence restarts empty (FLUSHALL here): the next message still runs."""
    prefix = unique("nogroup")
    queue = unique("q")
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")],
        queue={"broker": redis_server.url, "queue_name": queue},
    )
    r = redis.Redis.from_url(redis_server.url)
    async with online_daemon(config, subscribe=[config.results], workers=1) as d:
        await d.client.publish(f"{prefix}/before", b'{"temperature": 1}', qos=1)
        assert (await d.next_message(config.results, 60)).data["status"] == "success"
        r.flushall()  # stream, consumer group, everything
        await d.client.publish(f"{prefix}/after", b'{"temperature": 2}', qos=1)
        after = await d.next_message(config.results, 60)
        log = d.workers[0].log()
    assert after.data["status"] == "success"
    assert after.data["outputs"]["device_id"] == "after"
    assert "stream_group_recreated" in log
