"""Stage ``decode``: an MQTT payload becomes inputs (and perhaps a ``reply_to``), or is refused.

The decoded payload is merged over the trigger's ``inputs`` and the topic's
named fields (the payload wins). A payload that cannot be decoded (too
large, too deep, not UTF-8 or not JSON where that is required, not a JSON
object where ``payload_input: null`` requires one, a bad ``reply_to``) is
bad input: an error result with the reason, logged as ``bad_payload``. The
rules themselves live in :func:`flowerpower_daemon.sources.mqtt.decode_payload`.
"""

from __future__ import annotations

from ..settings import MqttSettings, MqttTrigger
from ..sources.mqtt import PayloadError, decode_payload
from .chain import Admission, Rejection

__all__ = ["Decode"]


class Decode:
    """Decode the payload of an MQTT trigger's message into the admission's inputs."""

    __slots__ = ("input_name", "max_bytes", "max_depth", "mode")

    def __init__(self, cfg: MqttTrigger, mqtt: MqttSettings) -> None:
        self.mode = cfg.payload
        self.input_name = cfg.payload_input
        self.max_bytes = mqtt.max_payload_bytes
        self.max_depth = mqtt.max_payload_depth

    async def __call__(self, admission: Admission) -> Rejection | None:
        payload = admission.event.payload
        if payload is None:  # an event that carries no message
            return None
        try:
            decoded, reply_to = decode_payload(
                payload,
                self.mode,
                self.input_name,
                max_bytes=self.max_bytes,
                max_depth=self.max_depth,
            )
        except PayloadError as exc:
            reason = str(exc)
            topic = admission.event.meta.get("topic")
            return Rejection("bad_input", reason, "bad_payload", {"topic": topic, "error": reason})
        admission.inputs.update(decoded)
        admission.reply_to = reply_to
        return None
