"""A worker reads the stream itself (queue/consume.py): entries it cannot run are logged and
acknowledged, never retried forever, and do not hold up the runs behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from control_harness import NO_SYSTEMD
from daemon_harness import configure, online_daemon, unique
from redis.asyncio import Redis

pytestmark = pytest.mark.timeout(120)


async def test_unreadable_and_foreign_entries_are_logged_and_acked(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    prefix = unique("se")
    triggers = [
        {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": f"{prefix}/{{device}}"}
    ]
    queue_name = unique("q")
    queue = {"broker": redis_server.url, "queue_name": queue_name}
    config = configure(tmp_path, mosquitto.port, triggers, queue=queue)
    foreign = {"task_id": "x1", "task_name": "someone.else", "labels": {}, "labels_types": {},
               "args": [{}], "kwargs": {}}
    not_an_object = {**foreign, "task_id": "x2", "task_name": "flowerpower.run_pipeline",
                     "args": [42]}
    redis = Redis.from_url(redis_server.url)
    try:
        async with online_daemon(
            config, subscribe=[config.results], workers=1, env=NO_SYSTEMD
        ) as d:
            for data in (b"not json {", orjson.dumps(foreign), orjson.dumps(not_an_object)):
                await redis.xadd(queue_name, {b"data": data})
            await d.client.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
            _, result, _ = await d.next_message(f"{d.tag}/results/temperature", 60)
            with anyio.fail_after(15):  # every entry acked: none left pending for the group
                while (await redis.xpending(queue_name, "flowerpower-workers"))["pending"]:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            [worker] = d.workers
            log = worker.log()
    finally:
        await redis.aclose()
    assert result["status"] == "success"
    assert log.count("stream_message_unreadable") == 2, log[-3000:]
    assert "stream_task_unknown" in log and "someone.else" in log
    assert "argument 0 is int" in log
