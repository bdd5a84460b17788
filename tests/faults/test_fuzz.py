"""Fault test 7: hypothesis-generated payloads and topics against one running daemon.

Every message is published with an MQTT v5 response topic and its own
correlation data; the test counts the answers per message (exactly one each,
success or error, with the expected reason where the case has one), checks
that every failure also reached the error topic, that the daemon still
answers ``status`` and that its RSS grew by less than 50 MB.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from control_harness import ready_daemon, request
from daemon_harness import DaemonProcess, configure, unique
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from services import MosquittoService

pytestmark = pytest.mark.timeout(300)

MAX_BYTES = 16 * 1024
MAX_DEPTH = 32
BATCH = 25
BATCHES = 82  # 82 x 25 = 2,050 generated cases
WARM_UP = 300
RSS_LIMIT_KB = 50 * 1024

#: Trigger name -> (payload mode, payload_input); all run the ``temperature`` pipeline.
TRIGGERS: dict[str, tuple[str, str | None]] = {
    "auto": ("auto", "payload"),
    "json": ("json", "payload"),
    "text": ("text", "device"),  # the text is the `device` input: its output echoes it
    "obj": ("json", None),  # a JSON object is required
}


# ---------------------------------------------------------------- the cases


class Case:
    """One message: its kind, trigger, topic level, payload and the answer it must get."""

    __slots__ = ("expect", "kind", "level", "payload", "trigger", "value")

    def __init__(
        self,
        kind: str,
        trigger: str,
        level: str,  # the topic level the trigger's {device} field captures
        payload: bytes,
        expect: str | None = None,  # "success", a reason the error must contain, or None
        value: Any = None,  # what the outputs must say for a success
    ) -> None:
        self.kind, self.trigger, self.level, self.payload = kind, trigger, level, payload
        self.expect, self.value = expect, value

    def __repr__(self) -> str:  # short: hypothesis prints failing batches
        payload = self.payload[:40] + (b"..." if len(self.payload) > 40 else b"")
        return (
            f"Case({self.kind}, {self.trigger}, {self.level!r}, {payload!r} [{len(self.payload)}])"
        )


# What Mosquitto accepts in a topic: no control characters, surrogates or
# non-characters (it disconnects a client that sends one), no wildcards or '/'.
levels = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Cn"), exclude_characters="/+#"), max_size=24
)
triggers = st.sampled_from(sorted(TRIGGERS))
int64 = st.integers(-(2**63), 2**63 - 1)  # orjson writes 64-bit integers only
json_scalars = st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
numbers = st.integers(-(10**9), 10**9) | st.floats(allow_nan=False, allow_infinity=False)
BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\x80",
    b"\xe2\x82",
    b"\xf8\x88\x80\x80",
]


def _loads_fails(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    return False


@st.composite
def good(draw: st.DrawFn) -> Case:
    trigger = draw(triggers)
    level = draw(levels)
    if trigger == "text":
        text = draw(st.text(max_size=40))
        return Case("good", trigger, level, text.encode(), "success", ("device", text))
    t = draw(numbers)
    payload = orjson.dumps({"temperature": t})
    return Case("good", trigger, level, payload, "success", ("celsius", float(t), level))


@st.composite
def wrong_type(draw: st.DrawFn) -> Case:
    name, expected = draw(st.sampled_from([("temperature", "float"), ("device", "str")]))
    bad: Any
    if name == "temperature":
        bad = draw(st.text(max_size=8) | st.booleans() | st.lists(int64, max_size=3))
    else:
        bad = draw(int64 | st.lists(st.text(max_size=3), max_size=2) | st.booleans())
    trigger = draw(st.sampled_from(["auto", "json", "obj"]))
    payload = orjson.dumps({"temperature": 1.5, name: bad})
    reason = f"input {name!r} has the wrong type: expected {expected}"
    return Case("wrong_type", trigger, draw(levels), payload, reason)


@st.composite
def oversized(draw: st.DrawFn) -> Case:
    size = draw(st.integers(MAX_BYTES + 1, 3 * MAX_BYTES))
    seed = draw(st.binary(min_size=1, max_size=16))
    payload = (seed * (size // len(seed) + 1))[:size]
    return Case(
        "oversized", draw(triggers), draw(levels), payload, f"exceeds the limit of {MAX_BYTES}"
    )


@st.composite
def too_deep(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(MAX_DEPTH + 1, 2000) | st.integers(1025, 2000))
    if draw(st.booleans()):
        payload = b"[" * depth + b"]" * depth
    else:
        payload = b'{"a":' * depth + b"0" + b"}" * depth
    trigger = draw(st.sampled_from(["auto", "json", "obj"]))
    return Case(
        "too_deep", trigger, draw(levels), payload, f"nested deeper than {MAX_DEPTH} levels"
    )


@st.composite
def bad_utf8(draw: st.DrawFn) -> Case:
    head = draw(st.text(max_size=10)).encode()
    bad = draw(st.sampled_from(BAD_UTF8))
    tail = draw(st.text(max_size=10)).encode()
    payload = draw(st.sampled_from([head + bad + tail, b'{"temperature": "' + bad + b'"}']))
    trigger = draw(triggers)
    # `auto` passes bytes that are not UTF-8 on as bytes (the pipeline then says what is missing).
    return Case(
        "bad_utf8", trigger, draw(levels), payload, None if trigger == "auto" else "not valid UTF-8"
    )


@st.composite
def not_object(draw: st.DrawFn) -> Case:
    value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    trigger = draw(st.sampled_from(["auto", "json", "obj"]))
    reason = "must be a JSON object" if trigger == "obj" else None
    return Case("not_object", trigger, draw(levels), orjson.dumps(value), reason)


@st.composite
def bad_json(draw: st.DrawFn) -> Case:
    text = draw(st.text(min_size=1, max_size=60).map(str.encode).filter(_loads_fails))
    trigger = draw(st.sampled_from(["json", "obj"]))
    return Case("bad_json", trigger, draw(levels), text, "not valid JSON")


@st.composite
def anything(draw: st.DrawFn) -> Case:
    """Random bytes, random JSON (random keys, reply_to, pipeline node names): any answer."""
    payload = draw(
        st.binary(max_size=300)
        | json_values.map(orjson.dumps)
        | st.dictionaries(
            st.sampled_from(["temperature", "threshold", "celsius", "device", "reply_to", "x"])
            | st.text(max_size=6),
            json_values,
            max_size=4,
        ).map(orjson.dumps)
    )
    return Case("anything", draw(triggers), draw(levels), payload)


cases = st.one_of(
    good(), wrong_type(), oversized(), too_deep(), bad_utf8(), not_object(), bad_json(), anything()
)


def check(case: Case, result: dict[str, Any]) -> None:
    """The answer fits the case."""
    assert result["pipeline"] == "temperature"
    assert result["trigger"]["name"] == case.trigger
    if case.expect is None:
        assert result["status"] in ("success", "failed"), (result["status"], result.get("error"))
        return
    if case.expect == "success":
        assert result["status"] == "success", result
        if case.value[0] == "celsius":
            _, celsius, device = case.value
            assert result["outputs"]["celsius"] == celsius
            assert result["outputs"]["device_id"] == device
        else:
            assert result["outputs"]["device_id"] == case.value[1]
        return
    assert result["status"] == "failed", result
    assert case.expect in result["error"]["message"], (case, result["error"])


# ---------------------------------------------------------------- the client


class Fuzzer:
    """One long-lived paho MQTT v5 client: publishes cases, counts answers per correlation."""

    def __init__(self, port: int, tag: str) -> None:
        self.tag = tag
        self.reply_topic = f"{tag}/reply"
        self.lock = threading.Condition()
        self.replies: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.error_run_ids: set[str] = set()
        self.errors: list[tuple[str, dict[str, Any]]] = []  # (error topic, result)
        self.sent: dict[int, Case] = {}
        self.next_id = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{tag}-fuzzer", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(self.reply_topic, 1), (f"{tag}/errors/#", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = orjson.loads(msg.payload)
        with self.lock:
            if msg.topic == self.reply_topic:
                self.replies[int(msg.properties.CorrelationData)].append(data)
            else:
                self.error_run_ids.add(data["run_id"])
                self.errors.append((msg.topic, data))
            self.lock.notify_all()

    def publish(self, case: Case) -> int:
        i = self.next_id
        self.next_id += 1
        self.sent[i] = case
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = str(i).encode()
        topic = f"{self.tag}/{case.trigger}/{case.level}/t"
        self.client.publish(topic, case.payload, qos=1, properties=props)
        return i

    def run(self, batch: list[Case], timeout: float = 60) -> list[tuple[Case, dict[str, Any]]]:
        """Publish a batch; wait until every message has an answer; return them."""
        ids = [self.publish(case) for case in batch]
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(i in self.replies for i in ids):
                left = deadline - time.monotonic()
                missing = [i for i in ids if i not in self.replies]
                assert left > 0, (
                    f"no answer to {len(missing)} messages: {[self.sent[i] for i in missing][:5]}"
                )
                self.lock.wait(left)
            return [(self.sent[i], self.replies[i][0]) for i in ids]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- the daemon


@dataclass
class Served:
    proc: DaemonProcess
    sock: Path
    fuzzer: Fuzzer


@pytest.fixture
def served(mosquitto: MosquittoService, tmp_path: Path) -> Iterator[Served]:
    tag = unique("fp")  # the daemon's client id: its topics and the triggers' start with it
    triggers = [
        {
            "name": name,
            "type": "mqtt",
            "pipeline": "temperature",
            "topic": f"{tag}/{name}/{{device}}/t" if name != "text" else f"{tag}/{name}/{{dev}}/t",
            "payload": mode,
            "payload_input": payload_input,
            **({"inputs": {"temperature": 2.0}} if name == "text" else {}),
        }
        for name, (mode, payload_input) in TRIGGERS.items()
    ]
    config = configure(
        tmp_path,
        mosquitto.port,
        triggers,
        tag=tag,
        log_level="WARNING",
        max_concurrent_runs=16,
        mqtt={"max_payload_bytes": MAX_BYTES, "max_payload_depth": MAX_DEPTH},
    )
    with ready_daemon(config) as run:
        fuzzer = Fuzzer(mosquitto.port, tag)
        try:
            yield Served(run.proc, config.sock, fuzzer)
        finally:
            fuzzer.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fuzzed_payloads_and_topics_each_get_one_answer(served: Served) -> None:
    """2,050 generated messages (+300 warm-up): one answer each, errors on the error topic."""
    fuzzer, proc = served.fuzzer, served.proc
    t0 = time.monotonic()
    warm = [
        Case(
            "good",
            "auto",
            f"w{i}",
            orjson.dumps({"temperature": i}),
            "success",
            ("celsius", float(i), f"w{i}"),
        )
        if i % 2
        else Case("oversized", "json", "w", b"x" * (MAX_BYTES + 1), "exceeds the limit")
        for i in range(WARM_UP)
    ]
    for start in range(0, WARM_UP, 100):
        for case, result in fuzzer.run(warm[start : start + 100]):
            check(case, result)
    rss_before = rss_kb(proc.proc.pid)
    kinds: dict[str, int] = defaultdict(int)

    @settings(
        max_examples=BATCHES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(st.lists(cases, min_size=BATCH, max_size=BATCH))
    def batch(generated: list[Case]) -> None:
        for case, result in fuzzer.run(generated):
            kinds[case.kind] += 1
            check(case, result)

    batch()
    fuzz_seconds = time.monotonic() - t0

    # Counts: every message exactly one answer, every failure also on the error topic.
    time.sleep(0.5)  # a late duplicate would show up here
    with fuzzer.lock:
        total = len(fuzzer.sent)
        answered = {i: len(r) for i, r in fuzzer.replies.items()}
        failed = {r[0]["run_id"] for r in fuzzer.replies.values() if r[0]["status"] != "success"}
        on_error_topic = set(fuzzer.error_run_ids)
    assert total == WARM_UP + BATCHES * BATCH
    assert sum(kinds.values()) == BATCHES * BATCH
    assert all(
        kinds[k] > 0
        for k in (
            "good",
            "wrong_type",
            "oversized",
            "too_deep",
            "bad_utf8",
            "not_object",
            "bad_json",
            "anything",
        )
    ), kinds
    assert set(answered) == set(range(total))
    assert set(answered.values()) == {1}, {i: n for i, n in answered.items() if n != 1}
    assert failed <= on_error_topic, len(failed - on_error_topic)

    # The daemon is up, answers `status`, counted every message, and its memory is bounded.
    assert proc.proc.poll() is None
    status = request(served.sock, "status", timeout=10)
    assert status["ok"] and status["result"]["state"] == "running", status
    counters = status["result"]["counters"]
    assert counters["messages_in"] == total, counters
    rss_after = rss_kb(proc.proc.pid)
    grown = rss_after - rss_before
    print(
        f"\nfuzz: {total} messages in {fuzz_seconds:.1f} s, kinds {dict(kinds)}, "
        f"RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB, counters {counters}"
    )
    assert grown < RSS_LIMIT_KB, f"RSS grew by {grown / 1024:.1f} MB"
    assert "Traceback" not in proc.log(), proc.log()[-3000:]
    assert os.path.exists(served.sock)


def test_reply_targets_no_result_can_be_published_to(served: Served) -> None:
    """A wildcard response topic or a bad ``reply_to`` never kills the daemon nor its link.

    Mosquitto forwards a response topic with a wildcard (no client may publish to
    it) and drops a client that publishes to a topic with control characters.
    Failures still reach the error topic; bad ``reply_to`` fields are bad input.
    """
    fuzzer, tag = served.fuzzer, served.fuzzer.tag
    errors_before = len(fuzzer.error_run_ids)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"{tag}/reply/+"
    props.CorrelationData = b"wild"
    topic = f"{tag}/json/d/t"
    fuzzer.client.publish(topic, b"not json", qos=1, properties=props)  # error: error topic
    fuzzer.client.publish(topic, b'{"temperature": 1}', qos=1, properties=props)  # result: nowhere
    for reply_to in ("a/+/b", "a/#", "$SYS/x", "a\x01b", "a\ufffeb", "", 5, "x" * 70_000):
        payload = orjson.dumps({"temperature": 1, "reply_to": reply_to})
        fuzzer.client.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 30
    with fuzzer.lock:
        while len(fuzzer.error_run_ids) < errors_before + 9 and time.monotonic() < deadline:
            fuzzer.lock.wait(1)
        got = len(fuzzer.error_run_ids) - errors_before
    assert got == 9, got
    # The link survived: the next message is answered, and status says MQTT is connected.
    good = Case(
        "good", "json", "after", b'{"temperature": 3}', "success", ("celsius", 3.0, "after")
    )
    [(case, result)] = fuzzer.run([good])
    check(case, result)
    status = request(served.sock, "status", timeout=10)["result"]
    assert status["mqtt"]["connected"] and status["mqtt"]["connects"] == 1, status["mqtt"]
    assert "Traceback" not in served.proc.log(), served.proc.log()[-3000:]


def test_each_limit_is_an_error_on_the_error_topic_with_its_reason(served: Served) -> None:
    """Plain publishes (no response topic): each bad payload's reason is on the error topic."""
    fuzzer, tag = served.fuzzer, served.fuzzer.tag
    cases = {
        # level: (trigger, payload, what the error must say)
        "type": (
            "json",
            b'{"temperature": "hot"}',
            "input 'temperature' has the wrong type: expected float, got str",
        ),
        "type2": (
            "auto",
            b'{"temperature": 1, "device": 7}',
            "input 'device' has the wrong type: expected str, got int",
        ),
        "deep": ("json", b"[" * 40 + b"]" * 40, f"nested deeper than {MAX_DEPTH} levels"),
        "deeper": ("auto", b"[" * 5000 + b"]" * 5000, f"nested deeper than {MAX_DEPTH} levels"),
        "utf8": (
            "json",
            b'{"temperature": "\xff"}',
            "payload is not valid UTF-8 (invalid start byte at byte 17)",
        ),
        "utf8t": (
            "text",
            b"caf\xe9",
            "payload is not valid UTF-8 (unexpected end of data at byte 3)",
        ),
        "array": ("obj", b"[1, 2]", "must be a JSON object, got a JSON array"),
        "big": (
            "auto",
            b"0" * (MAX_BYTES + 1),
            f"payload of {MAX_BYTES + 1} bytes exceeds the limit of {MAX_BYTES}",
        ),
        "json": ("json", b"{nope", "payload is not valid JSON"),
    }
    for level, (trigger, payload, _) in cases.items():
        fuzzer.client.publish(f"{tag}/{trigger}/{level}/t", payload, qos=1)
    deadline = time.monotonic() + 30
    with fuzzer.lock:
        while len(fuzzer.errors) < len(cases) and time.monotonic() < deadline:
            fuzzer.lock.wait(1)
        errors = list(fuzzer.errors)
    by_level = {
        result["trigger"]["topic"].split("/")[2]: (topic, result) for topic, result in errors
    }
    assert set(by_level) == set(cases), sorted(by_level)
    for level, (_, _, reason) in cases.items():
        topic, result = by_level[level]
        assert topic == f"{tag}/errors/temperature"
        assert result["status"] == "failed" and reason in result["error"]["message"], (
            level,
            result,
        )
        assert result["attempts"] == 1, result  # refused before the pipeline ran: never retried
