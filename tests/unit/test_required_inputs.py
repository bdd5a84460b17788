"""A payload that is not a JSON object must reach a node: ``RunRequest.required_inputs``.

MQTT requests drop inputs no node takes (a payload carries more than a
pipeline needs); but a payload that is not an object becomes the one input
``payload_input``, and dropping that would run the pipeline on its defaults
as if the message had said nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest

from flowerpower_daemon.dispatch.dispatcher import Dispatcher
from flowerpower_daemon.project.models import RunRequest, TriggerInfo
from flowerpower_daemon.settings import MqttTrigger, Settings
from flowerpower_daemon.sources.base import TriggerEvent

if TYPE_CHECKING:
    from conftest import ProjectFactory


class _Sink:
    async def emit(self, request: object, result: object) -> None:
        raise AssertionError(f"refused: {result}")


async def _admitted(payload: bytes, options: dict[str, object]) -> RunRequest:
    """The request the dispatcher builds for ``payload`` on an MQTT trigger with ``options``."""
    seen: list[RunRequest] = []

    async def kiq(request: RunRequest) -> None:
        seen.append(request)

    trigger = MqttTrigger.model_validate(
        {"name": "t", "type": "mqtt", "pipeline": "p", "topic": "s/x", **options}
    )
    d = Dispatcher(Settings(), [trigger], kiq=kiq, sink=_Sink(), remote=False)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            await d.submit(TriggerEvent("t", "mqtt", payload=payload, meta={"topic": "s/x"}), runs)
    [request] = seen
    return request


@pytest.mark.parametrize(
    ("payload", "options", "required"),
    [
        (b"garbage", {}, ("payload",)),  # auto: text
        (b"\xff\xfe", {}, ("payload",)),  # auto: bytes
        (b"3.5", {"payload_input": "reading"}, ("reading",)),  # a JSON number
        (b"[1, 2]", {"payload": "json"}, ("payload",)),  # a JSON array
        (b' {"a": 1', {}, ("payload",)),  # auto: looks like an object, is text
        (b'{"a": 1}', {"payload": "text"}, ("payload",)),  # text mode: always the input
        (b'{"a": 1}', {"payload": "bytes"}, ("payload",)),
        (b'{"a": 1}', {}, ()),  # an object: its fields are inputs, unknown ones dropped
        (b' {"payload": "x"}', {}, ()),  # an object naming the input: not required
        (b'{"payload": "x"}', {"payload": "json"}, ()),
        (b"", {}, ()),  # auto: an empty payload gives no input
    ],
)
async def test_decode_marks_a_payload_that_is_not_an_object_required(
    payload: bytes, options: dict[str, object], required: tuple[str, ...]
) -> None:
    request = await _admitted(payload, options)
    assert request.required_inputs == required
    assert RunRequest.from_dict(request.to_dict()).required_inputs == required


def test_required_inputs_travel_only_when_set() -> None:
    assert "required_inputs" not in RunRequest("p").to_dict()


HELLO = """
def greeting(name: str = "world") -> str:
    return "hello " + name
"""


def test_a_required_input_no_node_takes_is_an_input_error(projects: ProjectFactory) -> None:
    """Unknown inputs are dropped, a required one is not: an InputError naming it and the
    pipeline's inputs; a required input the pipeline takes runs."""
    project = projects.load({"hello": HELLO})
    mqtt = TriggerInfo("t", "mqtt")
    bad = RunRequest("hello", {"payload": "garbage"}, trigger=mqtt, required_inputs=("payload",))
    result = project.execute(bad)
    assert result.error is not None and result.error.type == "InputError"
    assert result.error.message == (
        "pipeline 'hello': the payload is not a JSON object, so it is the input 'payload' "
        "(the trigger's payload_input), which the pipeline does not take; its inputs: name"
    )
    assert result.error.node is None and not result.error.retryable  # no node ran
    dropped = RunRequest("hello", {"payload": "garbage"}, trigger=mqtt)
    assert project.execute(dropped).outputs == {"greeting": "hello world"}
    taken = RunRequest("hello", {"name": "bob"}, trigger=mqtt, required_inputs=("name",))
    assert project.execute(taken).outputs == {"greeting": "hello bob"}
