"""Redis beyond one server: a real 3-node Redis Cluster and a real Sentinel-managed master.

Each carries MQTT messages through two daemons (one MQTT shared subscription)
and a worker, with dedup keys (a duplicate is answered from the stored result,
not run again), timer tick locks (two daemons with the same 1 s interval
trigger: one run per tick), the run ledger and the shared job history on
that Redis; a store or lock that broke on the topology (a CROSSSLOT error on
the Cluster, say) would log its ``*_failed`` event. The worker's presence (a
``MULTI`` of its hash and the index) must list it as live in each daemon's
``status``.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from control_harness import request
from services import (
    RedisClusterNodes,
    RedisSentinelService,
)

from flowerpower_daemon.settings import QueueSettings, Settings
from flowerpower_daemon.state.history import history_for
from flowerpower_daemon.state.stores import open_redis
from tests.daemon_harness import (
    base_settings,
    client,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)

pytestmark = [pytest.mark.timeout(240)]

MESSAGES = 200
FAILURES = (
    "history_write_failed",
    "run_ledger_failed",
    "dedup_claim_failed",
    "dedup_complete_failed",
    "dedup_lookup_failed",
    "timer_lock_failed",
    "timer_state_write_failed",
    "timer_state_read_failed",
    "stream_heartbeat_failed",
    "enqueue_failed",
    "worker_beat_failed",
    "workers_listing_failed",
)


async def _carry(tmp_path: Path, mqtt_port: int, queue: dict[str, Any]) -> None:
    project = make_project(tmp_path)
    topic = unique("in")
    result_topic = f"{unique('out')}/{{pipeline}}"
    triggers = [
        {
            "name": "tagged",
            "type": "mqtt",
            "pipeline": "tagged",
            "topic": topic,
            "shared_group": "fleet",
            "dedup_key": "{payload.msg_id}",
        },
        {"name": "tick", "type": "interval", "pipeline": "stats", "every": "1s"},
    ]
    configs, tags, socks = [], [], []
    for i in range(2):
        home = tmp_path / f"daemon{i}"
        home.mkdir()
        s = base_settings(project, home, mqtt_port, log_level="DEBUG")
        s["queue"] = {**queue, "worker_concurrency": 8, "reclaim_after": 3}
        s["triggers"] = triggers
        s["mqtt"]["result_topic"] = result_topic
        configs.append(write_config(home, s))
        socks.append(Path(s["state_dir"]) / "control.sock")
        tags.append(s["mqtt"]["client_id"])
    tagged, ticks = result_topic.format(pipeline="tagged"), result_topic.format(pipeline="stats")
    got: list[dict[str, Any]] = []
    tick_results: list[dict[str, Any]] = []
    async with client(mqtt_port) as c, client(mqtt_port) as status:
        await c.subscribe(result_topic.format(pipeline="#"), qos=1)
        with (
            daemon(configs[0], command="worker") as worker,
            daemon(configs[0]) as one,
            daemon(configs[1]) as two,
        ):
            await wait_online(status, f"{tags[0]}/status", one, timeout=60)
            await wait_online(status, f"{tags[1]}/status", two, timeout=60)
            for i in range(MESSAGES):
                await c.publish(topic, orjson.dumps({"msg_id": i, "seconds": 0}), qos=1)

            async def until(count: int, timeout: float) -> None:
                with anyio.fail_after(timeout):
                    async for msg in c.messages:
                        data = orjson.loads(msg.payload)  # type: ignore[arg-type]
                        if msg.topic.matches(tagged):
                            got.append(data)
                        elif msg.topic.matches(ticks):
                            tick_results.append(data)
                        if len(got) >= count:
                            return

            try:
                await until(MESSAGES, 120)
                # The same dedup key again: answered from the stored result, not run.
                await c.publish(topic, orjson.dumps({"msg_id": 0, "seconds": 0}), qos=1)
                await until(MESSAGES + 1, 30)
            except TimeoutError:
                raise AssertionError(
                    f"{len(got)} results of {MESSAGES}; worker log:\n{worker.log()[-3000:]}"
                ) from None
            with anyio.move_on_after(2):  # a few more ticks
                await until(MESSAGES + 2, 2)
            # The worker's heartbeat (every second here) trims the acknowledged runs.
            redis = open_redis(QueueSettings(**queue).redis)
            try:
                with anyio.fail_after(30):
                    while await redis.client.xlen(queue["queue_name"]) > 2:  # noqa: ASYNC110
                        await anyio.sleep(0.2)
            finally:
                await redis.aclose()
            # The worker's heartbeat hash and index (one MULTI) list it as live in both
            # daemons' status, with the runs it did.
            name = f"{socket.gethostname()}:{worker.proc.pid}"
            for sock in socks:
                live = await _live_workers(sock, name, MESSAGES, 30)
                seen = [(w["name"], w["done"] >= MESSAGES) for w in live]
                assert seen == [(name, True)], (live, worker.log()[-3000:])
            for proc in (worker, one, two):
                assert proc.proc.poll() is None, proc.log()[-3000:]
            logs = [p.log() for p in (worker, one, two)]
    for log in logs:
        for failure in FAILURES:
            assert failure not in log, (failure, log[-3000:])
    by_msg = Counter(r["outputs"]["msg"] for r in got)
    assert set(by_msg) == set(range(MESSAGES))
    assert by_msg[0] == 2 and sum(by_msg.values()) == MESSAGES + 1
    assert all(r["status"] == "success" for r in got)
    zeros = {r["run_id"] for r in got if r["outputs"]["msg"] == 0}
    assert len(zeros) == 1  # the duplicate got the first run's result
    assert _runs(logs[0], "tagged") == MESSAGES  # the duplicate was not run
    # Each 1 s tick ran once, though both daemons fire it.
    runs = Counter(r["trigger"]["scheduled"] for r in tick_results)
    assert runs and max(runs.values()) == 1, runs
    assert sum(log.count("timer_tick_taken") for log in logs[1:]) >= 1
    # The shared history (one MULTI per run) holds every run.
    settings = Settings(queue=QueueSettings(**queue), triggers=[])
    async with history_for(settings) as history:
        assert await history.count() >= MESSAGES


async def _live_workers(sock: Path, name: str, done: int, timeout: float) -> list[Any]:
    """The daemon's ``status`` workers once ``name`` is live there with ``done`` runs done."""
    workers: list[Any] = []
    with anyio.move_on_after(timeout):
        while True:
            answer = request(sock, "status")
            assert answer["ok"], answer
            workers = answer["result"]["workers"]
            if any(w["name"] == name and w["done"] >= done for w in workers):
                break
            await anyio.sleep(0.5)
    return workers


def _runs(log: str, pipeline: str) -> int:
    count = 0
    for line in log.splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            count += entry.get("event") == "run_finished" and entry.get("pipeline") == pipeline
    return count


async def test_cluster_carries_messages_with_dedup_and_timer_locks(
    tmp_path: Path,
    mosquitto: Any,
    redis_cluster: RedisClusterNodes,
) -> None:
    """200 messages through two daemons and a worker on a 3-node Redis Cluster."""
    await _carry(tmp_path, mosquitto.port, {"broker": redis_cluster.url, "queue_name": unique("q")})


async def test_sentinel_block_carries_messages_with_dedup_and_timer_locks(
    tmp_path: Path,
    mosquitto: Any,
    redis_sentinel: RedisSentinelService,
) -> None:
    """The same through a Sentinel-managed master, configured by a ``queue.sentinel`` block."""
    queue = {
        "sentinel": {"master": "mymaster", "sentinels": [f"127.0.0.1:{redis_sentinel.port}"]},
        "queue_name": unique("q"),
    }
    await _carry(tmp_path, mosquitto.port, queue)
