"""``homeassistant:``: Home Assistant MQTT discovery (a button and a sensor per pipeline).

Off by default. With ``discovery: true`` the daemon publishes retained
discovery configs under ``prefix`` (Home Assistant's default is
``homeassistant``) and serves each pipeline's button on a command topic
under ``base_topic``; the payloads are built in
:mod:`flowerpower_daemon.mqtt.homeassistant`.
"""

from __future__ import annotations

import re
import string

from pydantic import Field, field_validator

from .base import _Frozen

__all__ = ["NODE_ID_RE", "HomeAssistantSettings", "node_id_from"]

#: What Home Assistant allows in a discovery topic's node id and object id.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NOT_NODE_ID = re.compile(r"[^A-Za-z0-9_-]")


def node_id_from(client_id: str) -> str:
    """A node id made from an MQTT client id: characters Home Assistant refuses become ``_``."""
    return _NOT_NODE_ID.sub("_", client_id) or "flowerpower"


def _published_topic(key: str, value: str, fields: frozenset[str]) -> str:
    """``value`` if it is a topic messages can be published to (``fields`` may be filled in)."""
    if not value or value.startswith("/") or value.endswith("/"):
        raise ValueError(f"{key} {value!r}: a topic without leading or trailing '/'")
    if "+" in value or "#" in value:
        raise ValueError(f"{key} {value!r}: no wildcards (+, #) in a published topic")
    if value.startswith("$"):
        raise ValueError(f"{key} {value!r}: topics starting with '$' are the broker's")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{key} {value!r}: {exc}") from None
    unknown = sorted(names - fields)
    if unknown:
        allowed = ", ".join(f"{{{f}}}" for f in sorted(fields)) or "none"
        raise ValueError(f"{key} {value!r}: unknown field(s) {', '.join(unknown)}; use {allowed}")
    return value


class HomeAssistantSettings(_Frozen):
    """Home Assistant MQTT discovery for the project's pipelines."""

    discovery: bool = False
    #: Home Assistant's discovery prefix (its MQTT integration's ``discovery_prefix``).
    prefix: str = "homeassistant"
    #: The ``<node_id>`` level of the discovery topics and the device's identifier;
    #: default: ``mqtt.client_id`` with characters outside ``[A-Za-z0-9_-]`` as ``_``.
    node_id: str | None = None
    #: Where each pipeline's command, state and attributes topics live
    #: (``<base_topic>/<pipeline>/run|state|attributes``).
    base_topic: str = "flowerpower/homeassistant/{node_id}"
    #: The device's name in Home Assistant; default ``FlowerPower daemon <node_id>``.
    device_name: str | None = Field(default=None, min_length=1)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _published_topic("prefix", value, frozenset())

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        return _published_topic("base_topic", value, frozenset({"node_id"}))

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None and not NODE_ID_RE.match(value):
            raise ValueError(
                f"node_id {value!r}: only letters, digits, '_' and '-' "
                "(what Home Assistant allows in a discovery topic)"
            )
        return value

    def node_for(self, client_id: str) -> str:
        """The node id in use: ``node_id``, or one made from the daemon's MQTT client id."""
        return self.node_id or node_id_from(client_id)
