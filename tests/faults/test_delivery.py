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
    NODELAY,
    base_settings,
    client,
    collect,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)

pytestmark = pytest.mark.timeout(300)


def _settings(
    tmp_path: Path, port: int, topic: str, dedup: bool = False, **extra: Any
) -> dict[str, Any]:
    s = base_settings(make_project(tmp_path), tmp_path, port, **extra)
    trigger: dict[str, Any] = {"name": "tagged", "type": "mqtt", "pipeline": "tagged", "topic": topic}
    if dedup:
        trigger["dedup_key"] = "{payload.msg_id}"
    s["triggers"] = [trigger]
    return s


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


async def test_sigkill_mid_stream_then_restart_loses_no_message(tmp_path: Path, mosquitto: Any) -> None:
    """200 QoS 1 messages; SIGKILL mid-way; after restart every id has exactly one run (dedup_key)."""
    topic = unique("work")
    s = _settings(tmp_path, mosquitto.port, topic, dedup=True, max_concurrent_runs=4)
    tag = s["mqtt"]["client_id"]
    config = write_config(tmp_path, s)
    n = 200
    async with aiomqtt.Client(
        "127.0.0.1", mosquitto.port, identifier=unique("watcher"), clean_session=False,
        socket_options=NODELAY,
    ) as c:
        await c.subscribe(f"{tag}/results/#", qos=1)
        with daemon(config) as first:
            await wait_online(c, f"{tag}/status", first)
            for i in range(n):
                await c.publish(topic, orjson.dumps({"msg_id": i, "seconds": 0.2}), qos=1)
            runs: dict[int, set[str]] = {}
            before = await _ids(c, f"{tag}/results/#", set(range(8)), timeout=60, runs=runs)
            first.signal(signal.SIGKILL)
            first.wait(10)
        assert 8 <= len(before) < n, before
        with daemon(config) as second:
            after = await _ids(
                c, f"{tag}/results/#", set(range(n)) - set(before), timeout=120, runs=runs
            )
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
    s = _settings(tmp_path, mosquitto.port, topic, dedup=True)
    tag = s["mqtt"]["client_id"]
    with daemon(write_config(tmp_path, s)) as proc:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            body = orjson.dumps({"msg_id": 5, "seconds": 0.05})
            await c.publish(topic, body, qos=1)
            [(_, first, _)] = await collect(c, f"{tag}/results/#", 1, timeout=20)
            await c.publish(topic, body, qos=1)
            await c.publish(topic, orjson.dumps({"msg_id": 6, "seconds": 0.05}), qos=1)
            got = await collect(c, f"{tag}/results/#", 2, timeout=20)
    again = [r for _, r, _ in got if r["outputs"]["msg"] == 5]
    fresh = [r for _, r, _ in got if r["outputs"]["msg"] == 6]
    assert [r["run_id"] for r in again] == [first["run_id"]]
    assert len(fresh) == 1 and fresh[0]["run_id"] != first["run_id"]


async def test_sigterm_with_ten_runs_in_flight_publishes_all_ten(tmp_path: Path, mosquitto: Any) -> None:
    """SIGTERM while 10 runs are in flight: all 10 results arrive and the daemon exits 0."""
    topic = unique("ten")
    s = _settings(tmp_path, mosquitto.port, topic, max_concurrent_runs=10, shutdown_timeout=20)
    tag = s["mqtt"]["client_id"]
    with daemon(write_config(tmp_path, s)) as proc:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            for i in range(10):
                await c.publish(topic, orjson.dumps({"msg_id": i, "seconds": 2.0}), qos=1)
            await anyio.sleep(1.0)
            proc.signal(signal.SIGTERM)
            seen = await _ids(c, f"{tag}/results/#", set(range(10)), timeout=40)
        assert proc.wait(30) == 0
    assert seen == Counter(range(10))


async def test_results_wait_in_outbox_while_broker_is_down(tmp_path: Path, mosquitto: Any) -> None:
    """The broker stops while a run is in flight; its result is published once the broker is back."""
    topic = unique("outbox")
    s = _settings(tmp_path, mosquitto.port, topic)
    s["mqtt"]["reconnect_max"] = 2.0
    tag = s["mqtt"]["client_id"]
    watcher = unique("watcher")
    with daemon(write_config(tmp_path, s)) as proc:
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, identifier=watcher, clean_session=False, socket_options=NODELAY
        ) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            await c.publish(topic, orjson.dumps({"msg_id": 7, "seconds": 1.0}), qos=1)
            await anyio.sleep(0.3)
        await mosquitto.astop()
        await anyio.sleep(5.0)  # the run finishes meanwhile; its result cannot go out
        await mosquitto.astart()
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, identifier=watcher, clean_session=False, socket_options=NODELAY
        ) as c:
            await c.subscribe(f"{tag}/results/#", qos=1)
            [(_, result, _)] = await collect(c, f"{tag}/results/#", 1, timeout=30)
        assert proc.proc.poll() is None, proc.log()
    assert result["outputs"] == {"msg": 7}
