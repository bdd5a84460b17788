"""Delivery promises under faults: real daemon, real Mosquitto, real signals."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import orjson
import pytest

from tests.daemon_harness import (
    Config,
    collect,
    configure,
    daemon,
    mqtt_trigger,
    online_daemon,
    started,
    unique,
    wait_online,
    watcher,
)

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path, port: int, topic: str, dedup: bool = False, **extra: Any) -> Config:
    """One MQTT trigger ``tagged`` on ``topic`` (with ``dedup_key`` when asked)."""
    options = {"dedup_key": "{payload.msg_id}"} if dedup else {}
    return configure(tmp_path, port, [mqtt_trigger("tagged", "tagged", topic, **options)], **extra)


async def _ids(
    c: aiomqtt.Client,
    topic_filter: str,
    want: set[int],
    timeout: float,
    runs: dict[int, set[str]] | None = None,
) -> Counter[int]:
    """Success results per msg id until every id in ``want`` was seen (bounded).

    ``runs`` collects the distinct run ids seen per msg id.
    """
    seen: Counter[int] = Counter()
    with anyio.move_on_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                result = orjson.loads(msg.payload)  # type: ignore[arg-type]
                if result["status"] == "success":
                    seen[result["outputs"]["msg"]] += 1
                    if runs is not None:
                        runs.setdefault(result["outputs"]["msg"], set()).add(result["run_id"])
                if want <= set(seen):
                    break
    return seen


async def test_sigkill_mid_stream_then_restart_loses_no_message(
    tmp_path: Path, mosquitto: Any
) -> None:
    """200 QoS 1 messages; SIGKILL mid-way; after restart every id has exactly one run (dedup_key)."""
    topic = unique("work")
    config = _config(tmp_path, mosquitto.port, topic, dedup=True, max_concurrent_runs=4)
    results = config.results
    n = 200
    async with watcher(mosquitto.port, unique("watcher")) as c:
        await c.subscribe(results, qos=1)
        async with online_daemon(config, subscriber=c) as d:
            for i in range(n):
                await c.publish(topic, orjson.dumps({"msg_id": i, "seconds": 0.2}), qos=1)
            runs: dict[int, set[str]] = {}
            before = await _ids(c, results, set(range(8)), timeout=60, runs=runs)
            d.proc.signal(signal.SIGKILL)
            d.proc.wait(10)
        assert 8 <= len(before) < n, before
        with daemon(config.path) as second:
            after = await _ids(c, results, set(range(n)) - set(before), timeout=120, runs=runs)
            assert second.proc.poll() is None
    total = before + after
    missing = set(range(n)) - set(total)
    assert not missing, f"lost: {sorted(missing)}"
    ran_twice = {i: r for i, r in runs.items() if len(r) > 1}
    assert not ran_twice, f"ran more than once: {ran_twice}"


async def test_duplicate_message_is_not_run_again_and_gets_the_earlier_result(
    tmp_path: Path, mosquitto: Any
) -> None:
    """The same dedup key twice: one run; the second message gets the first run's result again."""
    topic = unique("dup")
    config = _config(tmp_path, mosquitto.port, topic, dedup=True)
    async with online_daemon(config, subscribe=[config.results]) as d:
        c = d.client
        body = orjson.dumps({"msg_id": 5, "seconds": 0.05})
        await c.publish(topic, body, qos=1)
        _, first, _ = await d.next_message(config.results, timeout=20)
        await c.publish(topic, body, qos=1)
        await c.publish(topic, orjson.dumps({"msg_id": 6, "seconds": 0.05}), qos=1)
        got = await d.collect(config.results, 2, timeout=20)
    again = [r for _, r, _ in got if r["outputs"]["msg"] == 5]
    fresh = [r for _, r, _ in got if r["outputs"]["msg"] == 6]
    assert [r["run_id"] for r in again] == [first["run_id"]]
    assert len(fresh) == 1 and fresh[0]["run_id"] != first["run_id"]


async def test_sigterm_with_ten_runs_in_flight_publishes_all_ten(
    tmp_path: Path, mosquitto: Any
) -> None:
    """SIGTERM while 10 runs are in flight: all 10 results arrive and the daemon exits 0."""
    topic = unique("ten")
    config = _config(tmp_path, mosquitto.port, topic, max_concurrent_runs=10, shutdown_timeout=20)
    async with online_daemon(config, subscribe=[config.results]) as d:
        for i in range(10):
            await d.client.publish(topic, orjson.dumps({"msg_id": i, "seconds": 2.0}), qos=1)
        await anyio.sleep(1.0)
        d.proc.signal(signal.SIGTERM)
        seen = await _ids(d.client, config.results, set(range(10)), timeout=40)
        assert d.proc.wait(30) == 0
    assert seen == Counter(range(10))


async def test_results_wait_in_outbox_while_broker_is_down(tmp_path: Path, mosquitto: Any) -> None:
    """The broker stops while a run is in flight; its result is published once the broker is back."""
    topic = unique("outbox")
    config = _config(tmp_path, mosquitto.port, topic, mqtt={"reconnect_max": 2.0})
    me = unique("watcher")
    # The watcher comes and goes with the broker; the daemon stays up throughout.
    with started(config) as run:
        async with watcher(mosquitto.port, me) as c:
            await wait_online(c, config.status_topic, run.proc)
            await c.subscribe(config.results, qos=1)
            await c.publish(topic, orjson.dumps({"msg_id": 7, "seconds": 1.0}), qos=1)
            await anyio.sleep(0.3)
        await mosquitto.astop()
        await anyio.sleep(5.0)  # the run finishes meanwhile; its result cannot go out
        await mosquitto.astart()
        async with watcher(mosquitto.port, me) as c:
            await c.subscribe(config.results, qos=1)
            [(_, result, _)] = await collect(c, config.results, 1, timeout=30)
        assert run.proc.proc.poll() is None, run.proc.log()
    assert result["outputs"] == {"msg": 7}
