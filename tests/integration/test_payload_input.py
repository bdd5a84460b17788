"""A payload that is not a JSON object, on a real daemon: it reaches a node or is an error.

The tester's case: ``mosquitto_pub -m garbage`` on a trigger with the default
``payload_input: payload``, for a pipeline with no ``payload`` input, gave a
success result computed from the defaults (the input was dropped as unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import configure, make_project, mqtt_trigger, online_daemon, unique

pytestmark = pytest.mark.timeout(300)

HELLO = '''
def greeting(name: str = "world") -> str:
    """Greets ``name``."""
    return "hello " + name
'''


async def test_a_payload_that_is_not_an_object_must_be_an_input(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``garbage`` on the default payload_input: an InputError result naming the input and the
    pipeline's inputs, never a run on the defaults. A JSON object still runs (its unknown
    fields dropped); text on a ``payload_input`` the pipeline takes runs with it."""
    project = make_project(tmp_path)
    (project / "pipelines" / "hello.py").write_text(HELLO)
    prefix = unique("pin")
    triggers = [
        mqtt_trigger("plain", "hello", f"{prefix}/plain"),
        mqtt_trigger("named", "hello", f"{prefix}/named", payload_input="name"),
    ]
    config = configure(tmp_path, mosquitto.port, triggers, project=project)
    async with online_daemon(config, subscribe=[config.results, config.errors]) as d:
        await d.client.publish(f"{prefix}/plain", b"garbage", qos=1)
        _, bad, _ = await d.next_message(config.errors, timeout=30)
        await d.client.publish(f"{prefix}/plain", b'{"name": "ann", "extra": 1}', qos=1)
        _, obj, _ = await d.next_message(config.results, timeout=30)
        await d.client.publish(f"{prefix}/named", b"bob", qos=1)
        _, named, _ = await d.next_message(config.results, timeout=30)
    assert bad["status"] == "failed"
    assert bad["error"]["type"] == "InputError"
    assert bad["error"]["message"] == (
        "pipeline 'hello': the payload is not a JSON object, so it is the input 'payload' "
        "(the trigger's payload_input), which the pipeline does not take; its inputs: name"
    )
    assert "outputs" not in bad or not bad["outputs"]
    assert obj["status"] == "success" and obj["outputs"] == {"greeting": "hello ann"}
    assert named["status"] == "success" and named["outputs"] == {"greeting": "hello bob"}


async def test_the_required_input_crosses_redis_to_a_worker(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Scale-out: the request travels as JSON through a Redis stream; the worker still refuses
    the payload the pipeline does not take (``required_inputs`` went with it)."""
    project = make_project(tmp_path)
    (project / "pipelines" / "hello.py").write_text(HELLO)
    prefix = unique("pinr")
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    trigger = mqtt_trigger("plain", "hello", f"{prefix}/plain")
    config = configure(tmp_path, mosquitto.port, [trigger], project=project, queue=queue)
    async with online_daemon(config, subscribe=[config.errors], workers=1) as d:
        await d.client.publish(f"{prefix}/plain", b"garbage", qos=1)
        _, bad, _ = await d.next_message(config.errors, timeout=60)
    assert bad["error"]["type"] == "InputError"
    assert "the payload is not a JSON object" in bad["error"]["message"]
