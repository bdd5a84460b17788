"""MQTT trigger logic that needs no connection: topic filters with named fields, payload decoding.

``sensors/{device}/temperature`` subscribes to ``sensors/+/temperature`` and
turns the matched level into the input ``device``. The connection itself
(aiomqtt) lives in :mod:`flowerpower_daemon.mqtt.client`, the only module using it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import orjson

from ..errors import FlowerPowerError
from ..topics import TopicPattern, compile_topic

__all__ = [
    "PayloadError",
    "TopicPattern",
    "compile_topic",
    "decode_payload",
    "json_depth",
    "topic_name_problem",
]

MAX_JSON_DEPTH = 32


class PayloadError(FlowerPowerError, ValueError):
    """A message payload cannot be turned into pipeline inputs."""


def json_depth(value: object, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value (stops counting past ``limit``; no recursion)."""
    depth = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict | list):
            depth = max(depth, d)
            if depth > limit:
                return depth
            children: Iterable[object] = item.values() if isinstance(item, dict) else item
            stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return depth


def _utf8_error(payload: bytes) -> PayloadError | None:
    """The reason ``payload`` is not valid UTF-8, or ``None`` if it is."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return PayloadError(f"payload is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    return None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else type(value).__name__


def decode_payload(
    payload: bytes,
    mode: Literal["json", "text", "bytes", "auto"],
    input_name: str | None = "payload",
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
) -> tuple[dict[str, object], str | None]:
    """Turn a payload into inputs, plus the ``reply_to`` a JSON object may carry.

    A JSON object merges into the inputs; any other payload becomes the one
    input ``input_name``, or is refused when ``input_name`` is ``None`` (the
    trigger requires a JSON object). Raises :class:`PayloadError` with the
    reason: too large, not valid UTF-8 (``json``/``text``), not valid JSON
    (``json``), nested deeper than ``max_depth``, not an object (an empty
    or whitespace-only payload is not one either), a ``reply_to`` that is not
    a topic name results can be published to.

    ``auto`` tries JSON, then UTF-8 text, then passes the bytes; a payload that
    is JSON but too deep is refused in ``auto`` too, never passed on as text.
    """
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if mode == "bytes":
        return {_need(input_name, mode): payload}, None
    if mode == "text":
        err = _utf8_error(payload)
        if err is not None:
            raise err
        return {_need(input_name, mode): payload.decode("utf-8")}, None
    if not payload.strip():
        if input_name is None:
            raise PayloadError(
                f"payload must be a JSON object, got {_blank(payload)} "
                "(this trigger sets payload_input: null)"
            )
        if mode == "auto":
            return {}, None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):
            # orjson's own limit (1024 levels): the same answer as ours below.
            raise PayloadError(_too_deep(max_depth)) from None
        utf8 = _utf8_error(payload)
        if mode == "json":
            raise utf8 or PayloadError(f"payload is not valid JSON: {exc}") from None
        if input_name is None:
            raise PayloadError(
                "payload is not a JSON object (this trigger requires one): "
                + (str(utf8) if utf8 is not None else f"not valid JSON: {exc}")
            ) from None
        if utf8 is None:
            return {input_name: payload.decode("utf-8")}, None
        return {input_name: payload}, None
    # Counting brackets is cheap (C); walk the value only when it could be too deep.
    if payload.count(b"[") + payload.count(b"{") > max_depth and (
        json_depth(value, max_depth) > max_depth
    ):
        raise PayloadError(_too_deep(max_depth))
    if isinstance(value, dict):
        reply_to = value.pop("reply_to", None)
        return value, None if reply_to is None else _check_reply_to(reply_to)
    if input_name is None:
        raise PayloadError(
            f"payload must be a JSON object, got a JSON {_type_name(value)} "
            "(this trigger sets payload_input: null)"
        )
    return {input_name: value}, None


# What Mosquitto refuses in a UTF-8 string (it disconnects a client that sends one):
# NUL and C0/C1 control characters, surrogates and non-characters.
_BAD_TOPIC_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]"
)


def topic_name_problem(topic: str) -> str | None:
    """Why no message can be published to ``topic`` (``None`` if it can).

    paho refuses wildcards, empty and over-long topics (an exception in the
    publisher); Mosquitto drops the connection of a client that publishes to a
    topic with characters it refuses (again at every reconnect while the
    message waits in the outbox). Topics starting with ``$`` are the broker's.
    """
    if not topic:
        return "is empty"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "is longer than 65535 bytes"
    if "+" in topic or "#" in topic:
        return "contains a wildcard"
    if topic.startswith("$"):
        return "starts with '$' (reserved for the broker)"
    m = _BAD_TOPIC_CHARS.search(topic)
    if m is not None:
        return f"contains the character U+{ord(m.group()):04X}"
    return None


def _check_reply_to(reply_to: object) -> str:
    """``reply_to`` if a result can be published to it (see :func:`topic_name_problem`)."""
    if not isinstance(reply_to, str) or not reply_to:
        raise PayloadError("reply_to must be a non-empty topic name (a string)")
    bad = topic_name_problem(reply_to)
    if bad is not None:
        raise PayloadError(f"reply_to {reply_to[:80]!r} is not a valid topic name: it {bad}")
    return reply_to


def _blank(payload: bytes) -> str:
    """What a payload with nothing in it is called in an error message."""
    return (
        "an empty payload"
        if not payload
        else f"a blank payload ({len(payload)} bytes of whitespace)"
    )


def _too_deep(max_depth: int) -> str:
    return f"JSON payload is nested deeper than {max_depth} levels (mqtt.max_payload_depth)"


def _need(input_name: str | None, mode: str) -> str:
    if input_name is None:  # settings refuse this combination; a guard for direct callers
        raise PayloadError(f"payload: {mode} needs a payload_input name")
    return input_name
