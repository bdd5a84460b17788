"""The memory queue hands the run request to the task as the very object, through taskiq,
and keeps nothing once the run is handed over (or the hand-over failed)."""

from __future__ import annotations

from typing import Any

import pytest
from taskiq import Context, InMemoryBroker, TaskiqDepends
from taskiq.exceptions import TaskiqError
from taskiq.message import TaskiqMessage

from flowerpower_daemon.project.models import RunRequest
from flowerpower_daemon.queue.broker import (
    InProcessFormatter,
    InProcessReceiver,
    InProcessRequest,
    create_broker,
)
from flowerpower_daemon.settings import QueueSettings


async def test_the_request_object_reaches_the_task_and_nothing_is_held() -> None:
    broker = create_broker(QueueSettings())
    formatter = broker.formatter
    assert isinstance(formatter, InProcessFormatter)
    seen: list[Any] = []

    async def run_pipeline(request: InProcessRequest) -> str:
        seen.append(request.request)
        return "ok"

    task = broker.register_task(run_pipeline, task_name="t")
    await broker.startup()
    try:
        request = RunRequest("stats", inputs={"payload": b"\x00raw"})
        await task.kicker().with_task_id(request.run_id).kiq(InProcessRequest(request))
        assert seen == [request] and seen[0] is request  # not a copy, bytes untouched
        assert formatter._held == {}
        # A kick that fails before the task runs: the caller's forget() drops the message.
        lost = TaskiqMessage(
            task_id="lost", task_name="no-such-task", labels={}, labels_types={}, args=[], kwargs={}
        )
        with pytest.raises(TaskiqError):
            await broker.kick(formatter.dumps(lost))
        assert set(formatter._held) == {"lost"}
        formatter.forget("lost")
        assert formatter._held == {}
    finally:
        await broker.shutdown()


_CONTEXT: Any = TaskiqDepends()  # a marker: taskiq injects the Context


async def test_dependency_context_only_for_tasks_that_take_dependencies() -> None:
    """The run task (no dependencies) runs without taskiq's dependency context; a task
    that declares one (``TaskiqDepends``) still has it resolved."""
    broker = create_broker(QueueSettings())
    assert isinstance(broker, InMemoryBroker)
    assert isinstance(broker.receiver, InProcessReceiver)
    seen: list[object] = []

    async def plain(request: InProcessRequest) -> None:
        seen.append(request.request)

    async def with_context(request: InProcessRequest, ctx: Context = _CONTEXT) -> None:
        seen.append(ctx.message.task_id)

    plain_task = broker.register_task(plain, task_name="plain")
    context_task = broker.register_task(with_context, task_name="with-context")
    await broker.startup()
    try:
        request = RunRequest("stats")
        await plain_task.kicker().with_task_id("p").kiq(InProcessRequest(request))
        await context_task.kicker().with_task_id("c").kiq(InProcessRequest(request))
        assert seen == [request, "c"]
        assert set(broker.receiver.dependency_graphs) == {"with-context"}
    finally:
        await broker.shutdown()
