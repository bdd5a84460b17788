"""MQTT payload limits: size, JSON depth, UTF-8, object-only triggers, reply topics (no broker)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from flowerpower_daemon.mqtt.sinks import MqttResultSink
from flowerpower_daemon.project.models import RunRequest
from flowerpower_daemon.settings import ControlSettings, MqttSettings, MqttTrigger
from flowerpower_daemon.sources.mqtt import (
    PayloadError,
    decode_payload,
    json_depth,
    topic_name_problem,
)


def _nested(depth: int, kind: str = "list") -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _refused(payload: bytes, mode: Any = "auto", **kw: Any) -> str:
    with pytest.raises(PayloadError) as info:
        decode_payload(payload, mode, **kw)
    return str(info.value)


def test_size_limit() -> None:
    assert "exceeds the limit of 10" in _refused(b"x" * 11, "bytes", max_bytes=10)
    assert decode_payload(b"x" * 10, "bytes", max_bytes=10)[0] == {"payload": b"x" * 10}


@pytest.mark.parametrize("mode", ["json", "auto"])
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_depth_limit(mode: Any, kind: str) -> None:
    """At the limit is fine; one more level, and orjson's own 1024+ refusal, name the limit."""
    assert decode_payload(_nested(8, kind), mode, max_depth=8)
    for depth in (9, 1000, 1025, 100_000):
        reason = _refused(_nested(depth, kind), mode, max_depth=8)
        assert "nested deeper than 8 levels" in reason, (depth, reason)


def test_depth_check_is_iterative_and_cheap() -> None:
    """A wide flat payload is not walked; a deep one is walked without recursion."""
    wide = b"[" + b",".join([b"1"] * 50_000) + b"]"
    t0 = time.perf_counter()
    decode_payload(wide, "json", max_depth=2)
    assert time.perf_counter() - t0 < 0.5
    deep: Any = []
    for _ in range(50_000):  # deeper than Python's recursion limit
        deep = [deep]
    assert json_depth(deep, 32) == 33
    assert json_depth({"a": [1, {"b": 2}]}) == 3
    assert json_depth(5) == 0


def test_brackets_inside_strings_do_not_count() -> None:
    payload = b'{"s": "' + b"[[[[{{{{" * 10 + b'"}'
    assert decode_payload(payload, "json", max_depth=2)[0] == {"s": "[[[[{{{{" * 10}


@pytest.mark.parametrize("mode", ["json", "text"])
def test_invalid_utf8_is_named(mode: Any) -> None:
    reason = _refused(b'{"a": "\xff"}', mode)
    assert "not valid UTF-8" in reason and "at byte 7" in reason


def test_auto_passes_non_utf8_as_bytes_and_text_as_text() -> None:
    assert decode_payload(b"\xff\xfe", "auto") == ({"payload": b"\xff\xfe"}, None)
    assert decode_payload(b"hello", "auto", "msg") == ({"msg": "hello"}, None)
    assert decode_payload(b"", "auto") == ({}, None)


def test_bad_json() -> None:
    assert "not valid JSON" in _refused(b"{nope", "json")
    assert "not valid JSON" in _refused(b"", "json")


def test_non_object_becomes_the_payload_input() -> None:
    """Today's behaviour: a JSON value that is not an object is the one input ``payload_input``."""
    assert decode_payload(b"[1, 2]", "json") == ({"payload": [1, 2]}, None)
    assert decode_payload(b"3.5", "auto", "reading") == ({"reading": 3.5}, None)
    assert decode_payload(b'{"a": 1, "reply_to": "r/t"}', "json") == ({"a": 1}, "r/t")


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"[1]", "array"),
        (b"3", "number"),
        (b'"s"', "string"),
        (b"null", "null"),
        (b"true", "boolean"),
    ],
)
@pytest.mark.parametrize("mode", ["json", "auto"])
def test_object_required(payload: bytes, kind: str, mode: Any) -> None:
    """``payload_input: null``: anything but a JSON object is refused, naming what came."""
    reason = _refused(payload, mode, input_name=None)
    assert f"must be a JSON object, got a JSON {kind}" in reason
    assert decode_payload(b'{"x": 1}', mode, None) == ({"x": 1}, None)


def test_object_required_in_auto_mode_refuses_text_and_bytes() -> None:
    assert "not a JSON object" in _refused(b"hello", "auto", input_name=None)
    assert "not valid UTF-8" in _refused(b"\xff", "auto", input_name=None)
    # An empty or blank payload is no object either (issue 11); with an input name it is {}.
    assert "got an empty payload" in _refused(b"", "auto", input_name=None)
    assert "got a blank payload (3 bytes" in _refused(b" \n\t", "json", input_name=None)
    assert decode_payload(b"", "auto", "payload") == ({}, None)


def test_settings() -> None:
    assert MqttSettings().max_payload_depth == 32
    with pytest.raises(ValidationError):
        MqttSettings(max_payload_depth=2000)
    base = {"name": "t", "type": "mqtt", "pipeline": "p", "topic": "a/b"}
    assert MqttTrigger.model_validate({**base, "payload": "json", "payload_input": None})
    with pytest.raises(ValidationError, match="needs payload: json or auto"):
        MqttTrigger.model_validate({**base, "payload": "text", "payload_input": None})
    control = ControlSettings()
    assert (control.idle_timeout, control.max_clients) == (600.0, 512)


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("a/b", None),
        ("ü/😀/x y", None),
        ("", "is empty"),
        ("a/+/b", "wildcard"),
        ("a/#", "wildcard"),
        ("$SYS/x", "starts with '$'"),
        ("a\x00b", "U+0000"),
        ("a\x1fb", "U+001F"),
        ("a\x85b", "U+0085"),
        ("a\ufdd0b", "U+FDD0"),
        ("a\U0010fffeb", "U+10FFFE"),
        ("x" * 65536, "longer than 65535 bytes"),
    ],
)
def test_topic_name_problem(topic: str, problem: str | None) -> None:
    found = topic_name_problem(topic)
    assert found is None if problem is None else problem in (found or ""), found


@pytest.mark.parametrize("reply_to", ["a/+", "$SYS/x", "a\x01", "", 5, ["a"]])
def test_bad_reply_to_is_bad_input(reply_to: Any) -> None:
    """A reply_to no result could be published to is refused up front, naming the field."""
    payload = orjson.dumps({"x": 1, "reply_to": reply_to})
    assert "reply_to" in _refused(payload, "json")


def test_good_reply_to() -> None:
    assert decode_payload(b'{"x": 1, "reply_to": "my/replies"}', "json") == ({"x": 1}, "my/replies")
    assert decode_payload(b'{"x": 1, "reply_to": null}', "json") == ({"x": 1}, None)


def test_bytes_inputs_survive_the_queue_message() -> None:
    """A ``payload: bytes`` input reaches the runner as the same bytes, UTF-8 or not."""
    request = RunRequest("p", inputs={"payload": b"\xff\x00raw", "text": "t", "n": 1})
    data = orjson.loads(orjson.dumps(request.to_dict()))
    assert RunRequest.from_dict(data).inputs == {"payload": b"\xff\x00raw", "text": "t", "n": 1}


class _Link:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, msg: Any) -> bool:
        self.sent.append(msg.topic)
        return True


async def test_sink_skips_a_topic_it_cannot_publish_to() -> None:
    """A wildcard response topic is skipped (and counted); the error topic still gets it."""
    link = _Link()
    sink = MqttResultSink(link)  # type: ignore[arg-type]
    reply = {"topic": "replies/+", "error_topic": "errors/p", "correlation": "eA=="}
    await sink.publish_encoded(reply, b"{}", ok=False)
    assert link.sent == ["errors/p"]
    assert sink.unpublishable == 1
