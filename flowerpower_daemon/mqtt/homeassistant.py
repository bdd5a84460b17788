"""Home Assistant MQTT discovery payloads: pure functions of the settings and pipeline names.

With ``homeassistant.discovery: true`` each pipeline becomes two entities of
one Home Assistant device (the daemon):

- a ``button`` whose ``command_topic`` the daemon subscribes to (as an MQTT
  trigger: same dispatch, acks and backpressure as any other); a press
  publishes ``payload_press`` (``{}``, a JSON object: the pipeline's default
  inputs; a JSON object with inputs runs with those);
- a ``sensor`` whose state is the last run's status (``success``,
  ``failed``, ``cancelled``, ``timeout``: an ``enum`` sensor) and whose
  attributes are the last result message (``duration_ms``, ``outputs``,
  ``finished_at``, ``error``, ``run_id``, ...), both retained.

Both are ``available`` while the daemon's retained status says ``online``
(the ``status`` field of its JSON status message). Config topics are
``<prefix>/<component>/<node_id>/<pipeline>/config``; an empty retained
payload on one removes the entity (a pipeline gone at a reload). Nothing
here does I/O: :mod:`flowerpower_daemon.service.homeassistant` publishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import orjson

from ..project.encoding import encode_result
from ..project.models import RunResult, RunStatus
from ..settings import HomeAssistantSettings, MqttSettings

__all__ = [
    "ATTRIBUTES_MAX_BYTES",
    "PAYLOAD_PRESS",
    "Component",
    "Discovery",
    "changed",
    "removed",
]

Component = Literal["button", "sensor"]

#: What the button publishes: a JSON object, so the run gets the pipeline's default inputs.
PAYLOAD_PRESS = "{}"
#: The attributes message is the result message cut to this size: Home Assistant's
#: recorder does not store attributes larger than 16 KiB.
ATTRIBUTES_MAX_BYTES = 16 * 1024
_STATUSES: tuple[str, ...] = get_args(RunStatus)
_ORIGIN_NAME = "flowerpower-daemon"


@dataclass(frozen=True, slots=True)
class Discovery:
    """The discovery configs and state topics of one daemon (one Home Assistant device)."""

    prefix: str
    node_id: str
    base_topic: str
    device_name: str
    version: str
    #: The daemon's own retained status topic; ``None`` when ``mqtt.status_topic`` is off.
    availability_topic: str | None

    @classmethod
    def from_settings(
        cls, ha: HomeAssistantSettings, mqtt: MqttSettings, version: str
    ) -> Discovery | None:
        """The discovery of ``ha``; ``None`` when ``homeassistant.discovery`` is off.

        ``mqtt`` is the running daemon's (its client id and status topic): a reload
        that changes ``mqtt:`` takes effect at the next restart, and so does its
        part of the discovery.
        """
        if not ha.discovery:
            return None
        node = ha.node_for(mqtt.client_id)
        return cls(
            prefix=ha.prefix,
            node_id=node,
            base_topic=ha.base_topic.replace("{node_id}", node),
            device_name=ha.device_name or f"FlowerPower daemon {node}",
            version=version,
            availability_topic=mqtt.own_status_topic if mqtt.status_topic else None,
        )

    # ------------------------------------------------------------- topics

    def command_topic(self, pipeline: str) -> str:
        """Where the pipeline's button publishes (an MQTT trigger of the daemon)."""
        return f"{self.base_topic}/{pipeline}/run"

    def state_topic(self, pipeline: str) -> str:
        """The sensor's state: the last run's status (retained)."""
        return f"{self.base_topic}/{pipeline}/state"

    def attributes_topic(self, pipeline: str) -> str:
        """The sensor's attributes: the last result message (retained)."""
        return f"{self.base_topic}/{pipeline}/attributes"

    def config_topic(self, component: Component, pipeline: str) -> str:
        """``<prefix>/<component>/<node_id>/<object_id>/config`` (pipeline names are
        identifiers, so they are valid object ids)."""
        return f"{self.prefix}/{component}/{self.node_id}/{pipeline}/config"

    def unique_id(self, component: Component, pipeline: str) -> str:
        """Stable across restarts: made of the node id and the pipeline name only."""
        kind = "run" if component == "button" else "status"
        return f"flowerpower_{self.node_id}_{pipeline}_{kind}"

    # ------------------------------------------------------------- payloads

    def _common(self) -> dict[str, object]:
        out: dict[str, object] = {
            "device": {
                "identifiers": [f"flowerpower_{self.node_id}"],
                "name": self.device_name,
                "manufacturer": "FlowerPower",
                "model": "flowerpower-daemon",
                "sw_version": self.version,
            },
            "origin": {"name": _ORIGIN_NAME, "sw_version": self.version},
            "qos": 1,
        }
        if self.availability_topic is not None:
            # The status message is JSON ({"status": "online", ...}): the template takes
            # the field out, and Home Assistant compares it with the two payloads.
            out["availability"] = [
                {
                    "topic": self.availability_topic,
                    "value_template": "{{ value_json.status }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ]
        return out

    def button(self, pipeline: str) -> dict[str, object]:
        """The ``button`` config: pressing it runs ``pipeline`` with its default inputs."""
        return {
            "name": f"Run {pipeline}",
            "unique_id": self.unique_id("button", pipeline),
            "command_topic": self.command_topic(pipeline),
            "payload_press": PAYLOAD_PRESS,
            "retain": False,
            "icon": "mdi:play",
            **self._common(),
        }

    def sensor(self, pipeline: str) -> dict[str, object]:
        """The ``sensor`` config: the last run's status, its result as attributes."""
        return {
            "name": f"{pipeline} last run",
            "unique_id": self.unique_id("sensor", pipeline),
            "state_topic": self.state_topic(pipeline),
            "json_attributes_topic": self.attributes_topic(pipeline),
            "device_class": "enum",
            "options": list(_STATUSES),
            "icon": "mdi:pipe",
            **self._common(),
        }

    def configs(self, pipelines: Iterable[str]) -> dict[str, bytes]:
        """Config topic -> retained payload, for every pipeline's button and sensor."""
        out: dict[str, bytes] = {}
        for name in sorted(pipelines):
            out[self.config_topic("button", name)] = orjson.dumps(self.button(name))
            out[self.config_topic("sensor", name)] = orjson.dumps(self.sensor(name))
        return out

    def state_messages(self, result: RunResult) -> list[tuple[str, bytes]]:
        """(topic, retained payload) updating the sensor of ``result``'s pipeline."""
        attributes = encode_result(result, max_bytes=ATTRIBUTES_MAX_BYTES)
        return [
            (self.state_topic(result.pipeline), result.status.encode()),
            (self.attributes_topic(result.pipeline), attributes),
        ]


def removed(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> list[str]:
    """The topics to empty (retained) when ``new`` replaces ``old``: the config topics of
    ``old`` that ``new`` lacks, and the state and attributes topics their sensors named
    that no sensor of ``new`` uses (so the broker keeps nothing of a pipeline that is gone)."""
    gone = sorted(set(old) - set(new))
    in_use = {t for payload in new.values() for t in _sensor_topics(payload)}
    leftovers = {t for topic in gone for t in _sensor_topics(old[topic])} - in_use
    return gone + sorted(leftovers)


def _sensor_topics(config: bytes) -> list[str]:
    """The retained topics a sensor config names (none for a button or a payload not ours)."""
    try:
        data = orjson.loads(config)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(data, dict):
        return []
    found = (data.get("state_topic"), data.get("json_attributes_topic"))
    return [t for t in found if isinstance(t, str) and t and "+" not in t and "#" not in t]


def changed(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> dict[str, bytes]:
    """The configs of ``new`` that are not already published as they are in ``old``."""
    return {topic: payload for topic, payload in new.items() if old.get(topic) != payload}
