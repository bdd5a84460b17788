"""Home Assistant discovery payloads, checked against Home Assistant's documented fields.

What Home Assistant documents (and what these tests hold the payloads to):

- Discovery topic: ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config``;
  node_id and object_id only ``[a-zA-Z0-9_-]``; the payload is a JSON
  dictionary; an empty (retained) payload removes the entity
  (https://www.home-assistant.io/integrations/mqtt/#discovery-topic).
- MQTT button: ``command_topic`` is required; ``payload_press`` defaults to
  ``PRESS``; ``qos``, ``retain``, ``unique_id``, ``name``, ``device``,
  ``availability`` are optional
  (https://www.home-assistant.io/integrations/button.mqtt/).
- MQTT sensor: ``state_topic`` is required; ``json_attributes_topic`` (a JSON
  dictionary becomes the attributes), ``device_class`` (``enum`` needs
  ``options``), ``unique_id`` optional
  (https://www.home-assistant.io/integrations/sensor.mqtt/).
- ``availability``: a list of entries, each with a required ``topic``,
  optional ``payload_available`` (default ``online``), ``payload_not_available``
  (default ``offline``) and ``value_template`` (its result is compared with them).
- ``device``: works only with ``unique_id`` set; at least one of
  ``identifiers`` or ``connections``; ``name``, ``manufacturer``, ``model``,
  ``sw_version`` optional.
- ``origin`` (the application that supplies the discovery item, logged by Home
  Assistant): ``name`` required, ``sw_version`` and ``support_url`` optional
  (https://www.home-assistant.io/integrations/mqtt/#adding-information-about-the-origin-of-a-discovery-message).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.mqtt.homeassistant import (
    ATTRIBUTES_MAX_BYTES,
    Discovery,
    changed,
    removed,
)
from flowerpower_daemon.mqtt.link import OutgoingMessage, status_payload_factory
from flowerpower_daemon.project.api import FlowerPowerProject
from flowerpower_daemon.project.models import (
    ErrorInfo,
    RunRequest,
    RunResult,
    TriggerInfo,
    utcnow,
)
from flowerpower_daemon.settings import (
    HomeAssistantSettings,
    MqttSettings,
    Settings,
    load_settings,
)
from flowerpower_daemon.settings.homeassistant import node_id_from
from flowerpower_daemon.topics import compile_topic

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sensors"
ID_CHARS = re.compile(r"^[a-zA-Z0-9_-]+$")

# Home Assistant's documented required keys, per component (see the module docstring).
REQUIRED = {"button": {"command_topic"}, "sensor": {"state_topic"}}
AVAILABILITY_REQUIRED = {"topic"}
ORIGIN_REQUIRED = {"name"}
TOPIC_KEYS = ("command_topic", "state_topic", "json_attributes_topic")


def discovery(**ha: object) -> Discovery:
    mqtt = MqttSettings(client_id="fp-test.daemon")
    found = Discovery.from_settings(
        HomeAssistantSettings.model_validate({"discovery": True, **ha}), mqtt, "1.2.3"
    )
    assert found is not None
    return found


def check_documented(component: str, payload: dict[str, object]) -> None:
    """``payload`` has every field Home Assistant requires, in the documented shape."""
    assert REQUIRED[component] <= payload.keys()
    for key in TOPIC_KEYS:
        if key in payload:
            topic = payload[key]
            assert isinstance(topic, str) and topic
            assert "+" not in topic and "#" not in topic and not topic.startswith("$")
    assert isinstance(payload["unique_id"], str) and payload["unique_id"]
    device = payload["device"]
    assert isinstance(device, dict)
    assert device.get("identifiers") or device.get("connections")
    assert isinstance(device["identifiers"], list)
    origin = payload["origin"]
    assert isinstance(origin, dict) and ORIGIN_REQUIRED <= origin.keys()
    availability = payload["availability"]
    assert isinstance(availability, list) and availability
    for entry in availability:
        assert AVAILABILITY_REQUIRED <= entry.keys()
    if payload.get("device_class") == "enum":
        assert isinstance(payload.get("options"), list) and payload["options"]


def test_config_topics_follow_the_discovery_topic_format() -> None:
    d = discovery()
    configs = d.configs(["stats", "temperature"])
    assert sorted(configs) == [
        "homeassistant/button/fp-test_daemon/stats/config",
        "homeassistant/button/fp-test_daemon/temperature/config",
        "homeassistant/sensor/fp-test_daemon/stats/config",
        "homeassistant/sensor/fp-test_daemon/temperature/config",
    ]
    for topic, payload in configs.items():
        prefix, component, node, obj, last = topic.split("/")
        assert (prefix, last) == ("homeassistant", "config")
        assert ID_CHARS.match(node) and ID_CHARS.match(obj)
        data = orjson.loads(payload)
        assert isinstance(data, dict)
        check_documented(component, data)


def test_button_presses_run_the_pipeline_with_its_defaults() -> None:
    d = discovery()
    button = d.button("stats")
    assert button["command_topic"] == "flowerpower/homeassistant/fp-test_daemon/stats/run"
    # A JSON object: the trigger (payload: json, payload_input: null) takes no inputs from it.
    assert orjson.loads(str(button["payload_press"])) == {}
    assert button["qos"] == 1 and button["retain"] is False


def test_sensor_topics_are_the_daemon_s_and_statuses_are_its_options() -> None:
    d = discovery(base_topic="fp/ha/{node_id}")
    sensor = d.sensor("stats")
    assert sensor["state_topic"] == "fp/ha/fp-test_daemon/stats/state"
    assert sensor["json_attributes_topic"] == "fp/ha/fp-test_daemon/stats/attributes"
    assert sensor["options"] == ["success", "failed", "cancelled", "timeout"]


def test_availability_matches_what_the_daemon_publishes() -> None:
    """The template picks ``status`` out of the JSON status message; its two values are
    the two payloads Home Assistant compares with."""
    mqtt = MqttSettings(client_id="fp-test.daemon")
    d = discovery()
    [entry] = d.button("stats")["availability"]  # type: ignore[misc]
    assert entry["topic"] == mqtt.own_status_topic == "flowerpower/status/fp-test.daemon"
    assert entry["value_template"] == "{{ value_json.status }}"
    make = status_payload_factory("1.2.3", ["stats"], mqtt.client_id)
    assert orjson.loads(make("online"))["status"] == entry["payload_available"]
    assert orjson.loads(make("offline"))["status"] == entry["payload_not_available"]


def test_no_availability_without_a_status_topic() -> None:
    mqtt = MqttSettings(client_id="d", status_topic="")
    d = Discovery.from_settings(HomeAssistantSettings(discovery=True), mqtt, "1")
    assert d is not None and "availability" not in d.sensor("stats")


def test_device_origin_and_unique_ids() -> None:
    d = discovery(device_name="Garden pipelines")
    button, sensor = d.button("stats"), d.sensor("stats")
    assert (
        button["device"]
        == sensor["device"]
        == {
            "identifiers": ["flowerpower_fp-test_daemon"],
            "name": "Garden pipelines",
            "manufacturer": "FlowerPower",
            "model": "flowerpower-daemon",
            "sw_version": "1.2.3",
        }
    )
    assert button["origin"] == {"name": "flowerpower-daemon", "sw_version": "1.2.3"}
    # Stable across restarts (the same settings give the same ids), distinct per entity.
    again = discovery(device_name="Garden pipelines")
    assert again.button("stats")["unique_id"] == button["unique_id"]
    ids = {d.button(p)["unique_id"] for p in ("a", "b")} | {d.sensor(p)["unique_id"] for p in "ab"}
    assert len(ids) == 4


def test_discovery_off_means_none() -> None:
    assert Discovery.from_settings(HomeAssistantSettings(), MqttSettings(), "1") is None


def test_button_triggers_subscribe_to_the_command_topics() -> None:
    from flowerpower_daemon.service.check import configured_triggers

    project = FlowerPowerProject.load(str(EXAMPLE))
    settings = load_settings(None).model_copy(
        update={"homeassistant": HomeAssistantSettings(discovery=True)}
    )
    d = Discovery.from_settings(settings.homeassistant, settings.mqtt, "x")
    assert d is not None
    buttons = {
        t.pipeline: t for t in configured_triggers(settings, project) if t.name.startswith("home")
    }
    assert sorted(buttons) == sorted(project.pipelines)
    for name, trig in buttons.items():
        assert trig.type == "mqtt" and trig.topic == d.command_topic(name)
        assert trig.qos == 1 and trig.payload == "json" and trig.payload_input is None
        assert compile_topic(trig.topic).filter == trig.topic  # a plain topic, no fields
    off = load_settings(None)
    assert not [t for t in configured_triggers(off, project) if t.name.startswith("home")]


def _result(outputs: dict[str, object], status: str = "success") -> RunResult:
    request = RunRequest(pipeline="stats", trigger=TriggerInfo(name="manual", type="manual"))
    now = utcnow()
    if status == "success":
        result = RunResult.not_run(request, "success", ErrorInfo("x", "y", None, False))
        result.error = None
    else:
        result = RunResult.not_run(
            request, "failed", ErrorInfo("RuntimeError", "boom", None, False)
        )
    result.outputs = outputs
    result.started_at, result.finished_at = now - timedelta(milliseconds=250), now
    return result


def test_state_messages_carry_status_and_the_result_as_attributes() -> None:
    d = discovery()
    [(state_topic, state), (attr_topic, attrs)] = d.state_messages(_result({"count": 4}))
    assert state_topic == d.state_topic("stats") and state == b"success"
    assert attr_topic == d.attributes_topic("stats")
    data = orjson.loads(attrs)
    assert data["outputs"] == {"count": 4}
    assert data["duration_ms"] == pytest.approx(250.0)
    assert data["finished_at"] and data["status"] == "success"
    [(_, failed), (_, attrs)] = d.state_messages(_result({}, "failed"))
    assert failed == b"failed" and orjson.loads(attrs)["error"]["message"] == "boom"


def test_large_outputs_are_cut_to_fit_the_attributes() -> None:
    d = discovery()
    [_, (_, attrs)] = d.state_messages(_result({"blob": "x" * 100_000}))
    assert len(attrs) <= ATTRIBUTES_MAX_BYTES
    data = orjson.loads(attrs)
    assert data["truncated"] is True and data["duration_ms"] is not None


def test_removed_sensors_take_their_state_topics_along() -> None:
    d = discovery()
    old = d.configs(["a", "b"])
    new = d.configs(["b"])
    assert removed(old, new) == [
        "homeassistant/button/fp-test_daemon/a/config",
        "homeassistant/sensor/fp-test_daemon/a/config",
        d.attributes_topic("a"),
        d.state_topic("a"),
    ]
    # Another node with the same state topics (no {node_id} in base_topic): they stay.
    other = discovery(node_id="other", base_topic="fp/shared").configs(["a"])
    shared = discovery(base_topic="fp/shared").configs(["a"])
    assert removed(shared, other) == sorted(shared)
    assert removed({"x/config": b"not json"}, {}) == ["x/config"]


def test_removed_and_changed() -> None:
    old = {"a": b"1", "b": b"2"}
    new = {"b": b"2", "c": b"3"}
    assert removed(old, new) == ["a"]
    assert changed(old, new) == {"c": b"3"}
    assert changed(new, {"b": b"9"}) == {"b": b"9"}


def test_node_id_from_client_id() -> None:
    assert node_id_from("flowerpower-daemon") == "flowerpower-daemon"
    assert node_id_from("host.a/b c") == "host_a_b_c"


@pytest.mark.parametrize(
    ("block", "key", "words"),
    [
        ({"node_id": "a/b"}, "homeassistant.node_id", "only letters"),
        ({"prefix": "home/+"}, "homeassistant.prefix", "wildcards"),
        ({"prefix": "/homeassistant"}, "homeassistant.prefix", "leading"),
        ({"base_topic": "fp/{pipeline}"}, "homeassistant.base_topic", "unknown field"),
        ({"base_topic": "$SYS/fp"}, "homeassistant.base_topic", "broker"),
        ({"discovery": "maybe"}, "homeassistant.discovery", ""),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, block: dict[str, object], key: str, words: str
) -> None:
    path = tmp_path / "daemon.yml"
    path.write_text(orjson.dumps({"homeassistant": block}).decode())  # JSON is YAML
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    [problem] = info.value.problems
    assert problem.key == key and words in problem.message


class FakeLink:
    """What HomeAssistant uses of an MqttLink: publish (recorded), connects, connected."""

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.connects = 1
        self.connected = True

    async def publish(self, msg: OutgoingMessage) -> bool:
        self.sent.append(msg)
        return True


class RecordingSink:
    def __init__(self) -> None:
        self.results: list[RunResult] = []

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        self.results.append(result)


def ha_settings(**ha: object) -> Settings:
    return load_settings(None).model_copy(
        update={"homeassistant": HomeAssistantSettings.model_validate({"discovery": True, **ha})}
    )


async def test_sink_publishes_the_result_then_the_sensor_retained() -> None:
    from flowerpower_daemon.service.homeassistant import HomeAssistant, HomeAssistantSink

    link = FakeLink()
    ha = HomeAssistant(ha_settings(), link)  # type: ignore[arg-type]
    inner = RecordingSink()
    result = _result({}, "failed")
    result.status = "cancelled"
    await HomeAssistantSink(inner, ha).emit(RunRequest(pipeline="stats"), result)
    assert inner.results == [result]
    [state, attributes] = link.sent
    assert (state.topic, state.payload, state.retain, state.qos) == (
        "flowerpower/homeassistant/flowerpower-daemon/stats/state",
        b"cancelled",
        True,
        1,
    )
    assert attributes.retain and orjson.loads(attributes.payload)["status"] == "cancelled"


async def test_update_publishes_changes_only_and_discovery_off_removes_all() -> None:
    from flowerpower_daemon.service.homeassistant import HomeAssistant

    link = FakeLink()
    ha = HomeAssistant(ha_settings(), link)  # type: ignore[arg-type]
    await ha.update(ha_settings(), ["a", "b"])
    assert len(link.sent) == 4 and all(m.retain and m.payload for m in link.sent)
    link.sent.clear()
    await ha.update(ha_settings(), ["a", "b"])
    assert link.sent == []  # nothing changed, nothing sent
    await ha.update(load_settings(None), ["a", "b"])  # discovery switched off
    assert {m.payload for m in link.sent} == {b""}
    assert len(link.sent) == 4 + 4  # two configs and two sensor topics per pipeline
    link.sent.clear()
    result = _result({})
    await ha.publish_state(result)  # discovery off: no sensor updates
    assert link.sent == []
