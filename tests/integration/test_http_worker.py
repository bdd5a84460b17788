"""Redis mode: ``worker --http`` serves the runs' metrics; the daemon shows the queue."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import BIN, Config, configure, mqtt_trigger, online_daemon, unique
from tests.http_harness import metric_value, wait_metric, wait_status
from tests.services import free_port

pytestmark = pytest.mark.timeout(180)


@contextmanager
def worker_with_http(config: Path, port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``flowerpower-daemon worker -c CONFIG --http 127.0.0.1:PORT``, stopped on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [BIN / "flowerpower-daemon", "worker", "-c", config, "--http", f"127.0.0.1:{port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def redis_config(
    tmp_path: Path,
    mosquitto: Any,
    redis_server: Any,
    trigger: dict[str, Any],
    daemon_http: int | None = None,
) -> Config:
    """A daemon config with ``trigger``, its queue on the test's Redis (a queue of its own),
    and the daemon's HTTP listener on ``daemon_http`` when given."""
    http = {"http": {"listen": f"127.0.0.1:{daemon_http}"}} if daemon_http else {}
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    return configure(tmp_path, mosquitto.port, [trigger], queue=queue, **http)


async def test_worker_http_counts_its_runs_and_the_daemon_its_queue_and_workers(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """The worker's /metrics counts the runs it executed (by pipeline, trigger, status) and
    its /readyz is 200 once it consumes; the daemon's shows the live worker and the queue
    depth back at 0."""
    prefix = unique("w")
    daemon_http, worker_http = free_port(), free_port()
    trigger = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")
    config = redis_config(tmp_path, mosquitto, redis_server, trigger, daemon_http)
    log_path = tmp_path / "worker.log"
    with worker_with_http(config.path, worker_http, log_path) as worker:
        async with online_daemon(config, subscribe=[config.results]) as d:
            await wait_status(worker_http, "/readyz", 200, timeout=90)
            for i in range(3):
                await d.client.publish(f"{prefix}/dev{i}", b'{"temperature": 12}', qos=1)
            results = await d.collect(config.results, 3, timeout=60)
            assert all(r.data["status"] == "success" for r in results)
            runs = 'flowerpower_runs_total{pipeline="temperature",status="success",trigger="temp"}'
            text = await wait_metric(worker_http, runs, 3.0)
            count = 'flowerpower_run_latency_seconds_count{pipeline="temperature"}'
            assert metric_value(text, count) == 3.0, text
            text = await wait_metric(worker_http, "flowerpower_runs_done_total", 3.0)
            assert metric_value(text, "flowerpower_results_out_total") == 3.0, text
            assert metric_value(text, "flowerpower_mqtt_connected") == 1.0, text
            # The daemon reads the workers' listing every 2 s.
            text = await wait_metric(daemon_http, "flowerpower_workers", 1.0)
            # Acks go out with the worker's next writes (within LINGER): not at the result.
            text = await wait_metric(daemon_http, "flowerpower_queue_depth", 0.0)
            assert metric_value(text, 'flowerpower_trigger_fires_total{trigger="temp"}') == 3.0
            assert metric_value(text, "flowerpower_messages_in_total") == 3.0, text
        worker.terminate()
        assert worker.wait(30) == 0, log_path.read_text()[-3000:]


async def test_worker_http_counts_the_duplicates_it_drops(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A duplicate (same ``dedup_key``) that reaches the worker while the first run is
    under way is not run: the worker's ``flowerpower_dedup_hits_total`` counts it (the
    daemon's stays 0: it never saw the key finished)."""
    prefix = unique("wd")
    daemon_http, worker_http = free_port(), free_port()
    trigger = mqtt_trigger(
        "once",
        "slow",
        f"{prefix}/{{device}}",
        inputs={"seconds": 1.5},
        run={"final_vars": ["waited"]},
        dedup_key="{payload.msg_id}",
    )
    config = redis_config(tmp_path, mosquitto, redis_server, trigger, daemon_http)
    with worker_with_http(config.path, worker_http, tmp_path / "worker.log"):
        async with online_daemon(config, subscribe=[config.results]) as d:
            await wait_status(worker_http, "/readyz", 200, timeout=90)
            for _ in range(2):
                await d.client.publish(f"{prefix}/dev1", b'{"msg_id": "m1"}', qos=1)
            [result] = await d.collect(config.results, 1, timeout=60)
            assert result.data["status"] == "success"
            text = await wait_metric(worker_http, "flowerpower_dedup_hits_total", 1.0)
            runs = 'flowerpower_runs_total{pipeline="slow",status="success",trigger="once"}'
            assert metric_value(text, runs) == 1.0, text
            text = await wait_metric(daemon_http, "flowerpower_messages_in_total", 2.0)
            assert metric_value(text, "flowerpower_dedup_hits_total") == 0.0, text


async def test_worker_readyz_follows_redis(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """``/readyz`` means "consuming from the stream": 503 while Redis is down, 200 again
    once the worker reads the stream after Redis returns."""
    worker_http = free_port()
    trigger = mqtt_trigger("temp", "temperature", f"{unique('r')}/{{device}}")
    config = redis_config(tmp_path, mosquitto, redis_server, trigger)
    with worker_with_http(config.path, worker_http, tmp_path / "worker.log"):
        await wait_status(worker_http, "/readyz", 200, timeout=90)
        await redis_server.astop()
        body = await wait_status(worker_http, "/readyz", 503, timeout=30)
        assert "not consuming" in body, body
        await redis_server.astart()
        await wait_status(worker_http, "/readyz", 200, timeout=60)


async def test_daemon_readyz_says_when_the_redis_queue_takes_no_runs(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """With Redis down, a message's enqueue is retried (its MQTT message stays unacked):
    the daemon's ``/readyz`` answers 503 naming the Redis queue until the enqueue goes
    through, and the run's result still arrives once a worker runs it."""
    prefix = unique("q")
    daemon_http = free_port()
    trigger = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")
    config = redis_config(tmp_path, mosquitto, redis_server, trigger, daemon_http)
    async with online_daemon(config, subscribe=[config.results]) as d:
        await wait_status(daemon_http, "/readyz", 200, timeout=30)
        await redis_server.astop()
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
        body = await wait_status(daemon_http, "/readyz", 503, timeout=30)
        assert "Redis queue" in body and "retrying" in body, body
        await redis_server.astart()
        await wait_status(daemon_http, "/readyz", 200, timeout=60)
        with worker_with_http(config.path, free_port(), tmp_path / "worker.log"):
            [result] = await d.collect(config.results, 1, timeout=60)
    assert result.data["status"] == "success"
    assert result.data["outputs"]["device_id"] == "dev1"
