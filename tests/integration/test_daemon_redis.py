"""Scale-out mode: the daemon enqueues to a real Redis stream, a separate worker runs the pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon_harness import (
    base_settings,
    client,
    collect,
    collect_for,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)

# Each test starts real daemons (subprocesses); generous for a loaded machine.
pytestmark = pytest.mark.timeout(300)


async def test_mqtt_timer_and_reply_flows_through_redis_worker(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """With queue.broker on Redis, a worker process publishes results for MQTT, v5 reply and timer runs."""
    prefix = unique("r")
    s = base_settings(make_project(tmp_path), tmp_path, mosquitto.port)
    s["queue"] = {"broker": redis_server.url, "queue_name": unique("q")}
    s["triggers"] = [
        {
            "name": "temp",
            "type": "mqtt",
            "pipeline": "temperature",
            "topic": f"{prefix}/{{device}}",
        },
        {"name": "tick", "type": "interval", "pipeline": "stats", "every": "1s"},
    ]
    tag = s["mqtt"]["client_id"]
    config = write_config(tmp_path, s)
    reply_topic = unique("reply")
    with daemon(config) as proc, daemon(config, command="worker") as worker:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            await c.subscribe(reply_topic, qos=1)
            await c.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
            [(_, result, _)] = await collect(c, f"{tag}/results/temperature", 1, timeout=60)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = b"c-1"
            await c.publish(f"{prefix}/dev2", b'{"temperature": 13}', qos=1, properties=props)
            [(_, reply, rprops)] = await collect(c, reply_topic, 1, timeout=30)
            ticks = await collect_for(c, f"{tag}/results/stats", 3.0)
        assert worker.proc.poll() is None, worker.log()
    assert result["outputs"]["device_id"] == "dev1"
    assert result["status"] == "success"
    assert reply["outputs"]["device_id"] == "dev2"
    assert rprops.CorrelationData == b"c-1"
    # Ticks enqueued while the worker was still starting arrive in a burst: no upper bound here
    # (timing bounds are tested in memory mode in test_daemon_triggers.py).
    assert len(ticks) >= 1
    assert all(r["status"] == "success" for _, r in ticks)
    assert "worker_ready" in worker.log()


async def test_worker_stores_large_result_and_publishes_reference(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """mqtt.result_store works in a worker too: the message refers to the whole stored result."""
    project = make_project(tmp_path)
    (project / "pipelines" / "big.py").write_text(
        '"""Returns a long string."""\n\n\n'
        "def blob(size: int = 10) -> str:\n"
        '    """`size` times "x"."""\n    return "x" * size\n'
    )
    prefix = unique("big")
    store = tmp_path / "results"
    s = base_settings(project, tmp_path, mosquitto.port)
    s["mqtt"].update(max_result_bytes=1024, result_store=f"file://{store}/{{run_id}}.json")
    s["queue"] = {"broker": redis_server.url, "queue_name": unique("q")}
    s["triggers"] = [{"name": "big", "type": "mqtt", "pipeline": "big", "topic": prefix}]
    tag = s["mqtt"]["client_id"]
    config = write_config(tmp_path, s)
    with daemon(config) as proc, daemon(config, command="worker") as worker:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            await c.publish(prefix, b'{"size": 3000}', qos=1)
            [(_, result, _)] = await collect(c, f"{tag}/results/big", 1, timeout=60)
        assert worker.proc.poll() is None, worker.log()
    path = store / f"{result['run_id']}.json"
    assert result["status"] == "success" and result["outputs"] is None
    assert result["stored"] == {"url": f"file://{path}", "bytes": path.stat().st_size}
    assert orjson.loads(path.read_bytes())["outputs"] == {"blob": "x" * 3000}
