"""Result topic templates (fields filled in, made safe for one level, unknown names kept),
and the result store for results too large for one message."""

from __future__ import annotations

import dataclasses
import re
import uuid

import fsspec
import orjson
import pytest
from pydantic import ValidationError

from flowerpower_daemon.mqtt.link import OutgoingMessage
from flowerpower_daemon.mqtt.sinks import MqttResultSink, ResultStore, render_topic
from flowerpower_daemon.project.models import ErrorInfo, RunRequest, RunResult, TriggerInfo
from flowerpower_daemon.settings import MqttSettings

FIELDS = {"pipeline": "stats", "device": "a/b+#", "run_id": "r1", "n": None}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("flowerpower/results/{pipeline}", "flowerpower/results/stats"),
        ("out/{device}/{pipeline}", "out/a_b__/stats"),  # no extra levels, no wildcards
        ("out/{unknown}/{run_id}", "out/{unknown}/r1"),  # unknown names stay
        ("{{literal}}/{pipeline}", "{literal}/stats"),
        ("out/{n}", "out/None"),
        ("out/{device!r}", "out/'a_b__'"),  # str.format itself handles conversions
        ("fixed/topic", "fixed/topic"),
    ],
)
def test_render_topic(template: str, expected: str) -> None:
    assert render_topic(template, FIELDS) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("results/{run_id}.json", "is not a URL"),
        ("file:///r/{pipeline}.json", "must contain {run_id}"),
        ("file:///r/{device}/{run_id}.json", "unknown field(s) device"),
        ("file:///r/{run_id.x}.json", "unknown field(s) run_id.x"),
        ("file:///r/{run_id.json", "result_store"),
        ("nosuchfs://r/{run_id}.json", "nosuchfs"),
    ],
)
def test_result_store_setting_is_checked(url: str, problem: str) -> None:
    """mqtt.result_store must be an fsspec URL of a known protocol naming {run_id}."""
    with pytest.raises(ValidationError, match=re.escape(problem)):
        MqttSettings(result_store=url)
    ok = "memory://r/{pipeline}/{trigger}/{run_id}.json"
    assert MqttSettings(result_store=ok).result_store == ok


class _Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, msg: OutgoingMessage) -> bool:
        self.sent.append((msg.topic, msg.payload))
        return True


def _result(outputs: dict[str, object], error: ErrorInfo | None = None) -> RunResult:
    request = RunRequest(
        "stats", run_id=uuid.uuid4().hex, trigger=TriggerInfo(name="a/b", type="mqtt")
    )
    if error is None:
        result = RunResult.not_run(request, "failed", ErrorInfo("X", "x"))
        return dataclasses.replace(result, status="success", outputs=outputs, error=None)
    return dataclasses.replace(RunResult.not_run(request, "failed", error), outputs=outputs)


async def test_sink_stores_large_result_and_publishes_reference() -> None:
    """Over max_bytes: the whole result goes to the store, the message and result.encoded say where."""
    link = _Link()
    tag = uuid.uuid4().hex
    store = f"memory://{tag}/{{pipeline}}/{{trigger}}/{{run_id}}.json"
    sink = MqttResultSink(link, max_bytes=1024, result_store=store)  # type: ignore[arg-type]
    result = _result({"big": "x" * 5000})
    await sink.emit(RunRequest("stats", reply={"topic": "out"}), result)
    [(topic, payload)] = link.sent
    message = orjson.loads(payload)
    url = f"memory://{tag}/stats/a_b/{result.run_id}.json"  # a "/" in a field is no new level
    whole = fsspec.filesystem("memory").cat_file(url)
    assert message["stored"] == {"url": url, "bytes": len(whole)}
    assert message["outputs"] is None and message["status"] == "success"
    assert orjson.loads(whole)["outputs"] == {"big": "x" * 5000}
    assert result.encoded == payload  # what the job history keeps
    assert (topic, sink.results_stored) == ("out", 1)


async def test_reference_cuts_a_huge_error_and_a_failing_store_truncates() -> None:
    """A huge error message is cut in the reference; a store that fails leaves today's truncation."""
    link = _Link()
    store = f"memory://{uuid.uuid4().hex}/{{run_id}}.json"
    sink = MqttResultSink(link, max_bytes=1024, result_store=store)  # type: ignore[arg-type]
    failed = _result({}, ErrorInfo("Boom", "e" * 5000))
    await sink.emit(RunRequest("stats", reply={"topic": "out"}), failed)
    message = orjson.loads(link.sent[-1][1])
    assert len(link.sent[-1][1]) <= 1024 and message["truncated"] is True
    assert message["error"]["message"].endswith("e ... [truncated]")
    assert message["stored"]["bytes"] > 5000
    # A store that cannot write (its "directory" is a file): outputs truncated as without one.
    blocker = f"memory://{uuid.uuid4().hex}"
    fsspec.filesystem("memory").pipe_file(blocker, b"a file")
    sink.store = ResultStore(blocker + "/{run_id}.json")
    result = _result({"big": "x" * 5000})
    await sink.emit(RunRequest("stats", reply={"topic": "out"}), result)
    message = orjson.loads(link.sent[-1][1])
    assert message["truncated"] is True and message["outputs"]["big"]["__type__"] == "truncated"
    assert "stored" not in message
