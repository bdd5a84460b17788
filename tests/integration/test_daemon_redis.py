"""Scale-out mode: the daemon enqueues to a real Redis stream, a separate worker runs the pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon_harness import configure, make_project, online_daemon, unique

# Each test starts real daemons (subprocesses); generous for a loaded machine.
pytestmark = pytest.mark.timeout(300)


async def test_mqtt_timer_and_reply_flows_through_redis_worker(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """With queue.broker on Redis, a worker process publishes results for MQTT, v5 reply and timer runs."""
    prefix = unique("r")
    triggers = [
        {
            "name": "temp",
            "type": "mqtt",
            "pipeline": "temperature",
            "topic": f"{prefix}/{{device}}",
        },
        {"name": "tick", "type": "interval", "pipeline": "stats", "every": "1s"},
    ]
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    config = configure(tmp_path, mosquitto.port, triggers, queue=queue)
    reply_topic = unique("reply")
    async with online_daemon(config, subscribe=[config.results, reply_topic], workers=1) as d:
        [worker] = d.workers
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
        _, result, _ = await d.next_message(f"{d.tag}/results/temperature", timeout=60)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"c-1"
        await d.client.publish(f"{prefix}/dev2", b'{"temperature": 13}', qos=1, properties=props)
        _, reply, rprops = await d.next_message(reply_topic, timeout=30)
        ticks = await d.collect_for(f"{d.tag}/results/stats", 3.0)
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
    project = make_project(tmp_path / "big")
    (project / "pipelines" / "big.py").write_text(
        '"""Returns a long string."""\n\n\n'
        "def blob(size: int = 10) -> str:\n"
        '    """`size` times "x"."""\n    return "x" * size\n'
    )
    prefix = unique("big")
    store = tmp_path / "results"
    config = configure(
        tmp_path,
        mosquitto.port,
        [{"name": "big", "type": "mqtt", "pipeline": "big", "topic": prefix}],
        project=project,
        mqtt={"max_result_bytes": 1024, "result_store": f"file://{store}/{{run_id}}.json"},
        queue={"broker": redis_server.url, "queue_name": unique("q")},
    )
    async with online_daemon(config, subscribe=[config.results], workers=1) as d:
        await d.client.publish(prefix, b'{"size": 3000}', qos=1)
        _, result, _ = await d.next_message(f"{d.tag}/results/big", timeout=60)
        [worker] = d.workers
        assert worker.proc.poll() is None, worker.log()
    path = store / f"{result['run_id']}.json"
    assert result["status"] == "success" and result["outputs"] is None
    assert result["stored"] == {"url": f"file://{path}", "bytes": path.stat().st_size}
    assert orjson.loads(path.read_bytes())["outputs"] == {"blob": "x" * 3000}
