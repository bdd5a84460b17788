"""OpenTelemetry: one trace per run, trigger -> queue -> run -> Hamilton's node spans,
under the ``traceparent`` a device sent; the result carries the trace back.

The daemon and its worker are real processes exporting over real OTLP/HTTP
to a small collector in the test (tests/otlp_collector.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon_harness import BIN, configure, make_project, online_daemon, unique
from tests.otlp_collector import Collector, Span, otlp_collector, otlp_grpc_collector

pytestmark = pytest.mark.timeout(300)

NODES = {"celsius", "fahrenheit", "too_hot", "device_id"}


def new_traceparent() -> tuple[str, str, str]:
    """A device's ``traceparent`` and its trace and span ids."""
    trace_id = f"{random.getrandbits(128):032x}"
    span_id = f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def complete(trace_id: str) -> Any:
    """A predicate: the trace has the run's span and every node span."""

    def ready(spans: list[Span]) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {"trigger temp", "queue temperature", "run temperature"} <= names and NODES <= names

    return ready


def check_trace(spans: list[Span], trace_id: str, device_span: str) -> dict[str, Span]:
    """The spans of one run, checked for their parents; by name."""
    mine = [s for s in spans if s.trace_id == trace_id]
    by_name = {s.name: s for s in mine}
    trigger, queue, run = (
        by_name[n] for n in ("trigger temp", "queue temperature", "run temperature")
    )
    assert trigger.parent_id == device_span
    assert queue.parent_id == trigger.span_id
    assert run.parent_id == trigger.span_id
    assert trigger.end_ns <= queue.start_ns + 1 and queue.end_ns <= run.start_ns + 1
    # Hamilton's graph span (named by its own run id) under the run, the nodes under it.
    [graph] = [s for s in mine if s.parent_id == run.span_id]
    assert {s.name for s in mine if s.parent_id == graph.span_id} == NODES
    assert trigger.attributes["flowerpower.trigger.type"] == "mqtt"
    assert trigger.attributes["messaging.destination.name"].endswith("/dev1")
    assert run.attributes["flowerpower.status"] == "success"
    assert run.attributes["flowerpower.run_id"] == trigger.attributes["flowerpower.run_id"]
    return by_name


def traceparent_of(properties: Any) -> str:
    [value] = [
        v for k, v in (getattr(properties, "UserProperty", None) or []) if k == "traceparent"
    ]
    return str(value)


async def _run_one(
    collector: Collector, tmp_path: Path, mosquitto: Any, *, in_json: bool, **queue: Any
) -> None:
    """One MQTT message with a traceparent through a daemon (and a worker with Redis)."""
    prefix = unique("otel")
    trigger = {
        "name": "temp",
        "type": "mqtt",
        "pipeline": "temperature",
        "topic": f"{prefix}/{{device}}",
    }
    config = configure(tmp_path, mosquitto.port, [trigger], **queue)
    traceparent, trace_id, device_span = new_traceparent()
    workers = 1 if queue else 0
    env = collector.env()
    async with online_daemon(config, subscribe=[config.results], workers=workers, env=env) as d:
        props = Properties(PacketTypes.PUBLISH)
        payload: dict[str, object] = {"temperature": 21.5}
        if in_json:
            payload["traceparent"] = traceparent
        else:
            props.UserProperty = [("traceparent", traceparent)]
        await d.client.publish(f"{prefix}/dev1", orjson.dumps(payload), qos=1, properties=props)
        _, result, rprops = await d.next_message(f"{d.tag}/results/temperature", timeout=60)
        spans = await collector.wait_for(complete(trace_id))
    assert result["status"] == "success"
    by_name = check_trace(spans, trace_id, device_span)
    run = by_name["run temperature"]
    assert traceparent_of(rprops) == f"00-{trace_id}-{run.span_id}-01"
    services = {
        n: by_name[n].service for n in ("trigger temp", "queue temperature", "run temperature")
    }
    ran_in = "flowerpower-worker" if queue else "flowerpower-daemon"
    assert services == {
        "trigger temp": "flowerpower-daemon",
        "queue temperature": ran_in,
        "run temperature": ran_in,
    }


async def test_user_property_traceparent_is_the_parent_in_memory_mode(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A v5 user property ``traceparent`` parents trigger -> queue -> run -> node spans;
    the result carries the run span's ``traceparent`` back."""
    async with otlp_collector() as collector:
        await _run_one(collector, tmp_path, mosquitto, in_json=False)


async def test_json_field_traceparent_is_the_parent(tmp_path: Path, mosquitto: Any) -> None:
    """A ``traceparent`` field of a JSON payload parents the trace just the same."""
    async with otlp_collector() as collector:
        await _run_one(collector, tmp_path, mosquitto, in_json=True)


async def test_trace_crosses_the_redis_queue_to_a_worker(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Through Redis: the daemon's trigger span and the worker's queue, run and node spans
    are one trace under the device's span; the worker's result carries it back."""
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    async with otlp_collector() as collector:
        await _run_one(collector, tmp_path, mosquitto, in_json=False, queue=queue)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_adapter_host_and_port_get_the_pipelines_node_spans(
    tmp_path: Path, protocol: str
) -> None:
    """``with_adapter.opentelemetry`` with ``adapter.opentelemetry: {host, port}`` (FlowerPower's
    settings) exports the pipeline's spans over OTLP (gRPC by default) to that host and port,
    daemon tracing off."""
    import anyio

    project = make_project(tmp_path)
    serve = otlp_grpc_collector if protocol == "grpc" else otlp_collector
    async with serve() as collector:
        conf = project / "conf" / "pipelines" / "temperature.yml"
        text = conf.read_text()
        conf.write_text(
            text
            + "\nadapter:\n  opentelemetry:\n    host: 127.0.0.1\n"
            + f"    port: {collector.port}\n    tracer_name: temps\n"
        )
        proc = await anyio.run_process(
            [
                str(BIN / "flowerpower-daemon"),
                "pipeline",
                "run",
                "temperature",
                "--base-dir",
                str(project),
                "--inputs",
                '{"temperature": 40}',
                "--with-adapter",
                '{"opentelemetry": true}',
            ],
            env={
                **_clean_env(),
                **({} if protocol == "grpc" else {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol}),
            },
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
        spans = await collector.wait_for(lambda s: NODES <= {x.name for x in s})
    [graph] = [s for s in spans if s.parent_id == ""]
    assert {s.name for s in spans if s.parent_id == graph.span_id} == NODES


def _clean_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["HAMILTON_TELEMETRY_ENABLED"] = "false"
    return env
