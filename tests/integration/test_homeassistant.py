"""Home Assistant MQTT discovery on a real Mosquitto: retained configs, button presses, sensors.

The discovery payloads are held to what Home Assistant documents:

- discovery topic ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config``,
  node_id/object_id in ``[a-zA-Z0-9_-]``, a JSON dictionary as payload, retained;
  an empty retained payload removes the entity
  (https://www.home-assistant.io/integrations/mqtt/#discovery-topic);
- MQTT button: ``command_topic`` required, ``payload_press`` (default ``PRESS``)
  is what a press publishes (https://www.home-assistant.io/integrations/button.mqtt/);
- MQTT sensor: ``state_topic`` required; ``json_attributes_topic`` carries a JSON
  dictionary of attributes (https://www.home-assistant.io/integrations/sensor.mqtt/);
- ``availability``: entries with a required ``topic``; ``value_template``'s result
  is compared with ``payload_available`` / ``payload_not_available``;
- ``device``: only with ``unique_id``; at least one of ``identifiers`` or
  ``connections``; ``origin``: ``name`` required
  (https://www.home-assistant.io/integrations/mqtt/#adding-information-about-the-origin-of-a-discovery-message).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import anyio.to_thread
import orjson
import pytest
from control_harness import ok, wait_ready
from daemon_harness import (
    Config,
    client,
    configure,
    online_daemon,
    started,
    unique,
    wait_online,
)

pytestmark = pytest.mark.timeout(180)

ID_CHARS = re.compile(r"^[a-zA-Z0-9_-]+$")
REQUIRED = {"button": {"command_topic"}, "sensor": {"state_topic"}}


def ha_config(tmp_path: Path, port: int, **ha: Any) -> Config:
    """A daemon with discovery on (default prefix ``homeassistant``: each test has its broker)."""
    return configure(tmp_path, port, homeassistant={"discovery": True, **ha})


def pipelines_of(config: Config) -> list[str]:
    return sorted(p.stem for p in (Path(config.settings["project"]) / "pipelines").glob("[!_]*.py"))


async def raw(
    c: aiomqtt.Client, topic_filter: str, count: int, timeout: float = 30
) -> dict[str, bytes]:
    """The next ``count`` messages on ``topic_filter`` (topic -> payload, the last one wins)."""
    out: dict[str, bytes] = {}
    seen = 0
    with anyio.fail_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                assert isinstance(msg.payload, bytes)
                out[msg.topic.value] = msg.payload
                seen += 1
                if seen >= count:
                    break
    return out


async def retained(port: int, topic_filter: str, first: float = 1.0) -> dict[str, aiomqtt.Message]:
    """What the broker retains on ``topic_filter``: a fresh subscriber collects until no
    message came for 0.2 s (or none within ``first`` s)."""
    found: dict[str, aiomqtt.Message] = {}
    async with client(port) as c:
        await c.subscribe(topic_filter, qos=1)
        messages = aiter(c.messages)
        while True:
            with anyio.move_on_after(0.2 if found else first):
                msg = await anext(messages)
                found[msg.topic.value] = msg
                continue
            return found


def check_config(topic: str, payload: dict[str, Any], config: Config, node: str) -> None:
    """One discovery message against Home Assistant's documented fields (module docstring)."""
    prefix, component, node_id, object_id, last = topic.split("/")
    assert (prefix, node_id, last) == ("homeassistant", node, "config")
    assert ID_CHARS.match(node_id) and ID_CHARS.match(object_id)
    assert REQUIRED[component] <= payload.keys(), payload
    for key in ("command_topic", "state_topic", "json_attributes_topic"):
        if key in payload:
            assert not set(payload[key]) & {"+", "#"} and not payload[key].startswith("$")
    assert payload["unique_id"]
    assert payload["device"]["identifiers"]
    assert payload["origin"]["name"] == "flowerpower-daemon"
    [availability] = payload["availability"]
    assert availability["topic"] == config.status_topic  # what the daemon publishes
    assert availability["value_template"] == "{{ value_json.status }}"
    assert (availability["payload_available"], availability["payload_not_available"]) == (
        "online",
        "offline",
    )


async def test_discovery_press_sensor_and_reload(tmp_path: Path, mosquitto: Any) -> None:
    """Retained configs for every pipeline; a press runs it and updates its sensor; a reload
    that deletes one pipeline and adds another empties the one's configs and adds the other's."""
    config = ha_config(tmp_path, mosquitto.port)
    node = config.tag
    names = pipelines_of(config)
    configs_filter = f"homeassistant/+/{node}/+/config"
    async with online_daemon(config, subscribe=[config.results]) as d:
        wait_ready(config.sock, d.proc)
        # Published once online: collect them as a fresh subscriber sees them (retained).
        with anyio.fail_after(30):
            while len(found := await retained(config.port, configs_filter)) < 2 * len(names):
                pass
        found = await retained(config.port, configs_filter)  # all there: all retained copies
        assert sorted(found) == sorted(
            f"homeassistant/{c}/{node}/{p}/config" for c in ("button", "sensor") for p in names
        )
        payloads = {t: orjson.loads(m.payload) for t, m in found.items()}  # type: ignore[arg-type]
        for topic, message in found.items():
            assert message.retain and message.qos == 1
            check_config(topic, payloads[topic], config, node)
        assert len({p["unique_id"] for p in payloads.values()}) == len(payloads)
        assert len({orjson.dumps(p["device"]) for p in payloads.values()}) == 1
        status = (await retained(config.port, config.status_topic))[config.status_topic]
        assert orjson.loads(status.payload)["status"] == "online"  # type: ignore[arg-type]

        button = payloads[f"homeassistant/button/{node}/stats/config"]
        sensor = payloads[f"homeassistant/sensor/{node}/stats/config"]
        await d.client.subscribe(sensor["state_topic"], qos=1)
        await d.client.subscribe(sensor["json_attributes_topic"], qos=1)
        # Pressing the button = what Home Assistant does: payload_press to command_topic.
        await d.client.publish(button["command_topic"], button["payload_press"], qos=1)
        result = await d.next_message(config.results, 30)
        assert result.topic.endswith("/stats") and result.data["status"] == "success"
        assert result.data["trigger"]["name"] == "homeassistant:stats"
        assert result.data["outputs"]["count"] == 4  # the pipeline's default inputs
        sensed = await raw(d.client, f"flowerpower/homeassistant/{node}/stats/+", 2)
        state = sensed[sensor["state_topic"]]
        attributes = orjson.loads(sensed[sensor["json_attributes_topic"]])
        assert state == b"success"
        assert attributes["run_id"] == result.data["run_id"]
        assert attributes["duration_ms"] > 0 and attributes["finished_at"]
        assert attributes["outputs"] == result.data["outputs"]
        kept = await retained(config.port, sensor["state_topic"])
        assert kept[sensor["state_topic"]].payload == b"success"  # a restarted HA sees it too

        # A failing pipeline's sensor says so.
        broken = payloads[f"homeassistant/button/{node}/broken/config"]
        await d.client.subscribe(f"flowerpower/homeassistant/{node}/broken/state", qos=1)
        await d.client.publish(broken["command_topic"], broken["payload_press"], qos=1)
        failed = await raw(d.client, f"flowerpower/homeassistant/{node}/broken/state", 1)
        assert list(failed.values()) == [b"failed"]

        # Reload: `broken` (which ran) deleted, `fresh` added.
        project = Path(config.settings["project"])
        (project / "pipelines" / "broken.py").unlink()
        (project / "pipelines" / "fresh.py").write_text(
            '"""New at reload."""\n\n\ndef answer() -> int:\n    """42."""\n    return 42\n'
        )
        await d.client.subscribe(configs_filter, qos=1)
        await raw(d.client, configs_filter, 2 * len(names))  # the retained copies, at once
        report = await anyio.to_thread.run_sync(lambda: ok(config.sock, "reload"))
        assert report["pipelines_removed"] == ["broken"]
        assert report["pipelines_added"] == ["fresh"]
        assert "homeassistant:broken" in report["removed"]
        assert "homeassistant:fresh" in report["added"]
        changes = await raw(d.client, configs_filter, 4)
        assert changes[f"homeassistant/button/{node}/broken/config"] == b""
        assert changes[f"homeassistant/sensor/{node}/broken/config"] == b""
        fresh = orjson.loads(changes[f"homeassistant/button/{node}/fresh/config"])
        check_config(f"homeassistant/button/{node}/fresh/config", fresh, config, node)
        now = await retained(config.port, configs_filter)
        assert not [t for t in now if "/broken/" in t]  # an empty retained payload clears it
        # Its sensor's retained state and attributes are cleared too.
        assert not await retained(config.port, f"flowerpower/homeassistant/{node}/broken/+")

        # The new button runs its pipeline; the old one runs nothing.
        await d.client.publish(button["command_topic"].replace("/stats/", "/broken/"), "{}", qos=1)
        await d.client.publish(fresh["command_topic"], fresh["payload_press"], qos=1)
        result = await d.next_message(config.results, 30)
        assert result.topic.endswith("/fresh") and result.data["outputs"] == {"answer": 42}
        assert not await d.collect_for(config.results, 1.0)
    assert "homeassistant_discovery_published" in d.proc.log()


async def test_restart_keeps_ids_and_clears_a_pipeline_deleted_while_down(
    tmp_path: Path, mosquitto: Any
) -> None:
    """The same configs (unique ids) after a restart; a pipeline deleted while the daemon
    was stopped has its retained configs emptied at the next start."""
    config = ha_config(tmp_path, mosquitto.port, node_id="garden", device_name="Garden")
    configs_filter = "homeassistant/+/garden/+/config"
    names = pipelines_of(config)

    async def run_once() -> dict[str, bytes]:
        with started(config) as run:
            async with client(config.port) as c:
                await wait_online(c, config.status_topic, run.proc)
                wait_ready(config.sock, run.proc)
                with anyio.fail_after(30):
                    while True:
                        found = await retained(config.port, configs_filter)
                        if {t.split("/")[3] for t in found} == set(pipelines_of(config)):
                            break
        return {t: bytes(m.payload) for t, m in found.items()}  # type: ignore[arg-type]

    first = await run_once()
    assert len(first) == 2 * len(names)
    assert orjson.loads(first["homeassistant/sensor/garden/stats/config"])["device"]["name"] == (
        "Garden"
    )
    (Path(config.settings["project"]) / "pipelines" / "tagged.py").unlink()
    second = await run_once()
    assert not [t for t in second if "/tagged/" in t]
    assert second == {t: p for t, p in first.items() if "/tagged/" not in t}  # ids stable


async def test_configs_come_back_after_the_broker_forgot_them(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A config the broker lost (cleared here, as a broker without persistence would after a
    restart) is published again once the daemon has reconnected."""
    config = ha_config(tmp_path, mosquitto.port)
    lost = f"homeassistant/button/{config.tag}/stats/config"
    with started(config) as run:
        async with client(config.port) as c:
            await wait_online(c, config.status_topic, run.proc)
            with anyio.fail_after(30):
                while lost not in await retained(config.port, lost):
                    pass
            await c.publish(lost, b"", qos=1, retain=True)
        assert lost not in await retained(config.port, lost)
        await mosquitto.arestart()
        try:
            with anyio.fail_after(60):
                # retained() waits a second for a first message: no busy loop.
                while lost not in (found := await retained(config.port, lost)):
                    pass
        except TimeoutError:
            log = run.proc.log()[-3000:]
            raise AssertionError(f"config not published again; log:\n{log}") from None
        assert orjson.loads(found[lost].payload)["command_topic"].endswith("/stats/run")  # type: ignore[arg-type]
    assert "homeassistant_discovery_republished" in run.proc.log()


async def test_a_worker_s_run_updates_the_sensor(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Queue on Redis: the worker that runs the pressed pipeline updates its sensor."""
    config = configure(
        tmp_path,
        mosquitto.port,
        homeassistant={"discovery": True},
        queue={"broker": redis_server.url, "queue_name": unique("q")},
    )
    base = f"flowerpower/homeassistant/{config.tag}/stats"
    sensor = [f"{base}/state", f"{base}/attributes"]
    async with online_daemon(config, subscribe=[config.results, *sensor], workers=1) as d:
        await d.client.publish(f"{base}/run", "{}", qos=1)
        result = await d.next_message(config.results, 60)
        assert result.data["status"] == "success" and result.data["worker"]
        sensed = await raw(d.client, f"{base}/+", 2)
    assert sensed[f"{base}/state"] == b"success"
    assert orjson.loads(sensed[f"{base}/attributes"])["worker"] == result.data["worker"]
