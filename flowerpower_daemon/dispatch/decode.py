"""Stage ``decode``: an MQTT payload becomes inputs (and perhaps a ``reply_to``), or is refused.

The decoded payload is merged over the trigger's ``inputs`` and the topic's
named fields (the payload wins). A payload that cannot be decoded (too
large, too deep, not UTF-8 or not JSON where that is required, not a JSON
object where ``payload_input: null`` requires one, a bad ``reply_to``) is
bad input: an error result with the reason, logged as ``bad_payload``. The
rules themselves live in :func:`flowerpower_daemon.sources.mqtt.decode_payload`.
A payload that is not a JSON object becomes the input ``payload_input`` and
is marked required: a pipeline that has no such input fails with an
InputError rather than run on its defaults.
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
        if self.input_name is not None and self._wrapped(payload, decoded):
            admission.required_inputs = (self.input_name,)
        return None

    def _wrapped(self, payload: bytes, decoded: dict[str, object]) -> bool:
        """Whether the payload became the one input ``payload_input`` (it is not a JSON object).

        Such an input must reach a node: dropped as an unknown input, the run
        would go on with the defaults as if the message said nothing. Told
        apart without parsing again: only an object starts with ``{`` once
        parsed; a ``{`` payload that was not JSON (``auto``) became the input
        as its whole text or bytes, which no value inside an object can be
        (its text is shorter than the payload).
        """
        name = self.input_name
        if name not in decoded:  # a blank payload in ``auto``: no input at all
            return False
        if self.mode in ("bytes", "text") or payload.lstrip()[:1] != b"{":
            return True
        if self.mode == "json" or len(decoded) != 1:
            return False
        value = decoded[name]
        return isinstance(value, bytes) or (
            isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) == len(payload)
        )
