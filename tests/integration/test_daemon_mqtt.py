"""The real daemon against a real Mosquitto: MQTT in, pipeline run, result out."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.daemon_harness import (
    BIN,
    base_settings,
    configure,
    daemon,
    make_project,
    mqtt_trigger,
    online_daemon,
    unique,
    write_config,
)
from tests.services import free_port

# Each test starts real daemons (subprocesses); generous for a loaded machine.
pytestmark = pytest.mark.timeout(300)


async def test_json_message_gives_result_with_outputs_and_topic_field(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A JSON reading on sensors/dev1/temperature yields a result with outputs and device dev1."""
    prefix = unique("sensors")
    temp = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}/temperature")
    config = configure(tmp_path, mosquitto.port, [temp])
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(f"{prefix}/dev1/temperature", b'{"temperature": 31.5}', qos=1)
        topic, result, _ = await d.next_message(config.results, timeout=20)
    assert topic == f"{d.tag}/results/temperature"
    assert result["status"] == "success"
    assert result["outputs"]["device_id"] == "dev1"
    assert result["outputs"]["fahrenheit"] == 31.5 * 9 / 5 + 32
    assert result["outputs"]["too_hot"] is True
    assert result["trigger"] == {
        "name": "temp",
        "type": "mqtt",
        "topic": f"{prefix}/dev1/temperature",
        "fields": {"device": "dev1"},
    }
    assert result["attempts"] == 1


async def test_v5_response_topic_gets_reply_with_same_correlation(
    tmp_path: Path, mosquitto: Any
) -> None:
    """An MQTT v5 request with response topic and correlation data is answered there, same correlation."""
    prefix = unique("req")
    reply_topic = unique("replies")
    temp = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")
    config = configure(tmp_path, mosquitto.port, [temp])
    async with online_daemon(config, subscribe=[reply_topic]) as d:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"corr-42"
        await d.client.publish(f"{prefix}/dev9", b'{"temperature": 10}', qos=1, properties=props)
        topic, result, rprops = await d.next_message(reply_topic, timeout=20)
    assert topic == reply_topic
    assert result["outputs"]["device_id"] == "dev9"
    assert rprops.CorrelationData == b"corr-42"


async def test_reply_to_field_of_json_payload(tmp_path: Path, mosquitto: Any) -> None:
    """A JSON payload's reply_to field names where its result goes (v3.1.1 clients have no response topic)."""
    prefix = unique("rt")
    reply_topic = unique("mine")
    temp = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")
    config = configure(tmp_path, mosquitto.port, [temp])
    async with online_daemon(config, subscribe=[reply_topic], v5=False) as d:
        body = orjson.dumps({"temperature": 5, "reply_to": reply_topic})
        await d.client.publish(f"{prefix}/d", body, qos=1)
        _, result, _ = await d.next_message(reply_topic, timeout=20)
    assert result["outputs"]["celsius"] == 5.0


async def test_bad_payload_and_failing_pipeline_give_errors_and_daemon_goes_on(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Garbage JSON and a failing pipeline each publish an error; the next good message still runs."""
    prefix = unique("bad")
    triggers = [
        mqtt_trigger("temp", "temperature", f"{prefix}/t/{{device}}", payload="json"),
        mqtt_trigger("boom", "broken", f"{prefix}/b"),
    ]
    config = configure(tmp_path, mosquitto.port, triggers)
    async with online_daemon(config, subscribe=[config.errors, config.results]) as d:
        c, tag = d.client, d.tag
        await c.publish(f"{prefix}/t/x", b"{not json", qos=1)
        await c.publish(f"{prefix}/b", b'{"x": 7}', qos=1)
        await c.publish(f"{prefix}/t/y", b'{"temperature": 1}', qos=1)
        got = await d.collect_for(f"{tag}/#", 6.0)
        assert d.proc.proc.poll() is None, d.proc.log()
        log = [orjson.loads(line) for line in d.proc.log().splitlines() if line.startswith("{")]
    # The failed run is a warning line with what failed where (journalctl -p warning).
    [failed] = [e for e in log if e["event"] == "run_finished" and e["status"] == "failed"]
    assert failed["level"] == "warning"
    assert (failed["error_type"], failed["node"]) == ("RuntimeError", "boom")
    errors = [r for t, r in got if t.startswith(f"{tag}/errors/")]
    results = [r for t, r in got if t.startswith(f"{tag}/results/")]
    by_pipeline = {r["pipeline"]: r for r in errors}
    assert by_pipeline["temperature"]["error"]["type"] == "PayloadError"
    assert "not valid JSON" in by_pipeline["temperature"]["error"]["message"]
    assert by_pipeline["broken"]["error"] == {
        "type": "RuntimeError",
        "message": "boom 7",
        "node": "boom",
    }
    assert [r["outputs"]["device_id"] for r in results if r["status"] == "success"] == ["y"]


async def test_sigterm_during_slow_run_publishes_result_and_exits_zero(
    tmp_path: Path, mosquitto: Any
) -> None:
    """SIGTERM while a 2 s run is in flight: its result is still published and the exit code is 0."""
    prefix = unique("slow")
    slow = mqtt_trigger("slow", "slow", prefix, inputs={"seconds": 2.0})
    config = configure(tmp_path, mosquitto.port, [slow])
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(prefix, b"{}", qos=1)
        got = await d.collect_for(config.results, 0.7)
        assert got == []
        d.proc.signal(signal.SIGTERM)
        _, result, _ = await d.next_message(config.results, timeout=15)
        assert result["status"] == "success"
        assert result["outputs"] == {"waited": 2.0}
        _, status, _ = await d.next_message(config.status_topic, timeout=15)
        assert status["status"] == "offline", status
        assert d.proc.wait(15) == 0


async def test_mqtt_build_config_hook_applies_to_its_message_only(
    tmp_path: Path, mosquitto: Any
) -> None:
    """The hooks/<pipeline>/hook.py config of one message does not leak into the next."""
    prefix = unique("hook")
    modal = mqtt_trigger("modal", "modal", prefix, overlap="queue")
    config = configure(tmp_path, mosquitto.port, [modal])
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(prefix, b'{"name": "Ab", "mode": "loud"}', qos=1)
        _, first, _ = await d.next_message(config.results, timeout=20)
        await d.client.publish(prefix, b'{"name": "Ab"}', qos=1)
        _, second, _ = await d.next_message(config.results, timeout=20)
    assert first["outputs"] == {"greeting": "AB"}
    assert second["outputs"] == {"greeting": "ab"}


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    """``flowerpower-daemon check -c CONFIG``, its output as text."""
    return subprocess.run(
        [str(BIN / "flowerpower-daemon"), "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_lists_every_problem(tmp_path: Path) -> None:
    """`flowerpower-daemon check` on a broken config prints each problem with its key path, exit 2."""
    project = make_project(tmp_path)
    config = tmp_path / "broken.yml"
    config.write_text(
        f"project: {project}\n"
        "mqtt:\n  url: http://nowhere\n  clientid: x\n"
        "max_concurrent_run: 3\n"
        "triggers:\n"
        "  - {type: mqtt, pipeline: temperature, topic: 'a/#/b'}\n"
        "  - {type: cron, pipeline: stats, cron: '61 * * * *'}\n"
        "  - {type: interval, pipeline: stats, every: 1h30x, run: {max_retry: 2}}\n"
    )
    proc = _check(config)
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    for expected in (
        "mqtt.url: invalid MQTT url 'http://nowhere'",
        "mqtt.clientid: unknown key; did you mean 'client_id'?",
        "max_concurrent_run: unknown key; did you mean 'max_concurrent_runs'?",
        "'#' must be the last level",
        "invalid cron expression '61 * * * *'",
        "invalid interval '1h30x'",
        "'max_retry' (did you mean 'max_retries'?)",
    ):
        assert expected in err, err

    good = tmp_path / "semantic.yml"
    good.write_text(
        f"project: {project}\n"
        "triggers:\n"
        "  - {type: mqtt, pipeline: nope, topic: 'a/b'}\n"
        "  - {type: mqtt, pipeline: temperature, topic: 'a/c', inputs: {temprature: 1}}\n"
    )
    proc = _check(good)
    assert proc.returncode == 2
    assert "triggers[0].pipeline: unknown pipeline 'nope'" in proc.stderr
    assert (
        "triggers[1].inputs: pipeline 'temperature': no node takes input 'temprature' "
        "(did you mean 'temperature'?)" in proc.stderr
    )


async def test_object_only_trigger_refuses_empty_payload_and_ignores_extra_fields(
    tmp_path: Path, mosquitto: Any
) -> None:
    """payload_input: null: an empty or blank payload is an error result; extra JSON fields are ignored."""
    prefix = unique("obj")
    temp = mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}", payload_input=None)
    config = configure(tmp_path, mosquitto.port, [temp])
    async with online_daemon(config, subscribe=[config.errors, config.results]) as d:
        await d.client.publish(f"{prefix}/empty", b"", qos=1)
        _, empty, _ = await d.next_message(config.errors, 20)
        await d.client.publish(f"{prefix}/blank", b" \n ", qos=1)
        _, blank, _ = await d.next_message(config.errors, 20)
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 20, "extra": 1}', qos=1)
        _, good, _ = await d.next_message(config.results, 20)
        assert d.proc.proc.poll() is None, d.proc.log()
    assert empty["status"] == blank["status"] == "failed"
    assert empty["error"] == {
        "type": "PayloadError",
        "message": "payload must be a JSON object, got an empty payload "
        "(this trigger sets payload_input: null)",
    }
    assert blank["error"]["type"] == "PayloadError"
    assert "got a blank payload (3 bytes of whitespace)" in blank["error"]["message"]
    assert good["status"] == "success", good
    assert good["outputs"]["celsius"] == 20.0


BIG_PIPELINE = (
    '"""Returns a string of `size` characters: for large-result tests."""\n\n\n'
    "def blob(size: int = 10) -> str:\n"
    '    """`size` times "x"."""\n    return "x" * size\n'
)


async def test_result_store_keeps_large_result_whole_and_publishes_reference(
    tmp_path: Path, mosquitto: Any
) -> None:
    """mqtt.result_store: a result over max_result_bytes is stored whole; MQTT and history get its reference."""
    project = make_project(tmp_path / "big")
    (project / "pipelines" / "big.py").write_text(BIG_PIPELINE)
    prefix = unique("big")
    store = tmp_path / "results"
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger("big", "big", prefix)],
        project=project,
        mqtt={
            "max_result_bytes": 1024,
            "result_store": f"file://{store}/{{pipeline}}/{{run_id}}.json",
        },
    )
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(prefix, b'{"size": 5000}', qos=1)
        _, large, _ = await d.next_message(config.results, 20)
        await d.client.publish(prefix, b'{"size": 10}', qos=1)
        _, small, _ = await d.next_message(config.results, 20)
        d.proc.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.proc.log()
    run_id = large["run_id"]
    path = store / "big" / f"{run_id}.json"
    assert large["status"] == "success"
    assert large["outputs"] is None
    assert large["stored"] == {"url": f"file://{path}", "bytes": path.stat().st_size}
    assert large["trigger"]["name"] == "big" and large["duration_ms"] >= 0
    whole = orjson.loads(path.read_bytes())
    assert whole["run_id"] == run_id and whole["outputs"] == {"blob": "x" * 5000}
    # Under the limit: the outputs themselves, nothing stored.
    assert small["outputs"] == {"blob": "x" * 10} and "stored" not in small
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{run_id}.json"]
    # The job history keeps the reference, not a truncated copy.
    with closing(sqlite3.connect(tmp_path / "state" / "history.sqlite3")) as db:
        [(kept,)] = db.execute("SELECT result FROM jobs WHERE run_id = ?", (run_id,)).fetchall()
    assert orjson.loads(kept) == large
async def test_unreachable_broker_is_one_warning_per_attempt(tmp_path: Path) -> None:
    """Broker down: each retry is one `mqtt_disconnected` warning (the receiving link's)."""
    settings = base_settings(make_project(tmp_path), tmp_path, free_port(), log_level="DEBUG")
    settings["mqtt"].update(reconnect_min=0.1, reconnect_max=0.2)
    tag = settings["mqtt"]["client_id"]
    with daemon(write_config(tmp_path, settings)) as proc:
        with anyio.fail_after(120):
            while proc.log().count('"mqtt_disconnected"') < 8:
                assert proc.proc.poll() is None, proc.log()[-3000:]
                await anyio.sleep(0.2)
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.log()[-3000:]
        events = [orjson.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    disconnects = [e for e in events if e["event"] == "mqtt_disconnected"]
    warned = [e["client_id"] for e in disconnects if e["level"] == "warning"]
    assert len(warned) >= 3 and set(warned) == {tag}, disconnects
    quiet = [e["client_id"] for e in disconnects if e["level"] == "debug"]
    assert quiet and set(quiet) == {f"{tag}-results"}, disconnects
