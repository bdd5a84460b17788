"""MQTT trigger logic that needs no connection: topic filters with named fields, payload decoding.

``sensors/{device}/temperature`` subscribes to ``sensors/+/temperature`` and
turns the matched level into the input ``device``. The connection itself
(aiomqtt) lives in :mod:`flowerpower_daemon.mqtt`, the only module using it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ..errors import FlowerPowerError

__all__ = ["PayloadError", "TopicPattern", "compile_topic", "decode_payload", "json_depth"]

_FIELD_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
MAX_JSON_DEPTH = 32


class PayloadError(FlowerPowerError, ValueError):
    """A message payload cannot be turned into pipeline inputs."""


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled topic filter: the MQTT filter to subscribe to and the named levels."""

    source: str
    filter: str
    levels: tuple[str, ...]
    fields: Mapping[int, str]

    def match(self, topic: str) -> dict[str, str] | None:
        """The named fields if ``topic`` matches this filter, else ``None``."""
        parts = topic.split("/")
        out: dict[str, str] = {}
        for i, level in enumerate(self.levels):
            if level == "#":
                return out if not topic.startswith("$") or i > 0 else None
            if i >= len(parts):
                return None
            if level == "+":
                if i == 0 and parts[0].startswith("$"):
                    return None
                name = self.fields.get(i)
                if name is not None:
                    out[name] = parts[i]
            elif level != parts[i]:
                return None
        return out if len(parts) == len(self.levels) else None


def compile_topic(source: str) -> TopicPattern:
    """Validate a topic filter (``+``, ``#``, ``{name}`` levels) and compile it."""
    if not source or len(source.encode()) > 65535:
        raise ValueError("topic filter must be 1 to 65535 bytes")
    if "\x00" in source:
        raise ValueError(f"topic filter {source!r} contains a NUL character")
    raw = source.split("/")
    levels: list[str] = []
    fields: dict[int, str] = {}
    for i, level in enumerate(raw):
        m = _FIELD_RE.match(level)
        if m:
            name = m.group(1)
            if name in fields.values():
                raise ValueError(f"topic filter {source!r}: field {{{name}}} appears twice")
            fields[i] = name
            levels.append("+")
        elif level == "#":
            if i != len(raw) - 1:
                raise ValueError(f"topic filter {source!r}: '#' must be the last level")
            levels.append("#")
        elif level == "+":
            levels.append("+")
        elif any(c in level for c in "+#{}"):
            raise ValueError(
                f"topic filter {source!r}: level {level!r} mixes wildcards or braces with text; "
                "a wildcard or {field} must be a whole level"
            )
        else:
            levels.append(level)
    return TopicPattern(source, "/".join(levels), tuple(levels), fields)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value (stops counting past ``limit``)."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict | list):
            depth = max(depth, d)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, d + 1) for c in children)
    return depth


def decode_payload(
    payload: bytes,
    mode: Literal["json", "text", "bytes", "auto"],
    input_name: str = "payload",
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
) -> tuple[dict[str, Any], str | None]:
    """Turn a payload into inputs, plus the ``reply_to`` a JSON object may carry.

    A JSON object merges into the inputs; any other payload becomes the one
    input ``input_name``. Raises :class:`PayloadError` with the reason.
    """
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if mode == "bytes":
        return {input_name: payload}, None
    if mode == "text":
        try:
            return {input_name: payload.decode("utf-8")}, None
        except UnicodeDecodeError as exc:
            raise PayloadError(
                f"payload is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    if not payload.strip() and mode == "auto":
        return {}, None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if mode == "json":
            raise PayloadError(f"payload is not valid JSON: {exc}") from None
        try:
            return {input_name: payload.decode("utf-8")}, None
        except UnicodeDecodeError:
            return {input_name: payload}, None
    if json_depth(value, max_depth) > max_depth:
        raise PayloadError(f"JSON payload is nested deeper than {max_depth} levels")
    if isinstance(value, dict):
        reply_to = value.pop("reply_to", None)
        return value, reply_to if isinstance(reply_to, str) and reply_to else None
    return {input_name: value}, None
