"""taskiq is the queue: a broker factory and the one task, ``run_pipeline``.

- ``memory``: taskiq's ``InMemoryBroker`` with ``await_inplace``: ``kiq``
  runs the task in the calling coroutine, so the caller knows when the run
  is finished and its result published (then it acks the MQTT message), with
  no result polling.
- ``redis://``: taskiq-redis ``RedisStreamBroker`` (consumer group, acks,
  reclaim of runs whose worker died) plus a Redis result backend;
  ``kiq`` returns once the request is durably in the stream, and
  ``flowerpower-daemon worker`` processes execute it.

Messages are serialised with orjson (taskiq's default is the standard
library's ``json``, several times slower per run). The task is registered
on a broker made per daemon (no module-level
registry); it runs the request through the runner and hands the result to
the sinks, so nobody waits for a result by polling.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from taskiq import AsyncBroker, AsyncTaskiqDecoratedTask, InMemoryBroker
from taskiq.result_backends.dummy import DummyResultBackend
from taskiq.serializers import ORJSONSerializer

from .dedup import DedupStore
from .encoding import encode_result
from .project.models import RunRequest, RunResult
from .project.runner import PipelineRunner
from .results import ResultSink
from .settings import QueueSettings

__all__ = ["TASK_NAME", "RunExecutor", "create_broker", "register_run_task"]

TASK_NAME = "flowerpower.run_pipeline"
log = structlog.get_logger("flowerpower_daemon.queue")


def create_broker(settings: QueueSettings, *, worker: bool = False) -> AsyncBroker:
    """The taskiq broker for ``queue.broker``."""
    if not settings.is_redis:
        # Nobody reads an in-memory task's result (the task hands it to the sinks), so
        # storing it in taskiq's result backend would only cost time per run.
        memory = InMemoryBroker(await_inplace=True, cast_types=False)
        return memory.with_result_backend(DummyResultBackend()).with_serializer(
            ORJSONSerializer()
        )
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        settings.broker, result_ex_time=86400
    )
    broker = RedisStreamBroker(
        settings.broker,
        queue_name=settings.queue_name,
        consumer_group_name=settings.consumer_group,
        idle_timeout=int(settings.reclaim_after * 1000),
        xread_block=1000,
    )
    return broker.with_result_backend(backend).with_serializer(ORJSONSerializer())


class RunExecutor:
    """What the task does: run the request, emit the result, count it."""

    def __init__(
        self,
        runner: PipelineRunner,
        sink: ResultSink,
        on_result: Callable[[RunRequest, RunResult], Awaitable[None]] | None = None,
        dedup: DedupStore | None = None,
    ) -> None:
        self.runner = runner
        self.sink = sink
        self.on_result = on_result
        self.dedup = dedup

    async def __call__(self, request_data: dict[str, Any]) -> dict[str, Any]:
        request = RunRequest.from_dict(request_data)
        t0 = time.perf_counter()
        with structlog.contextvars.bound_contextvars(
            run_id=request.run_id, pipeline=request.pipeline, trigger=request.trigger.name
        ):
            result = await self.runner.run(request)
            if self.dedup is not None and request.dedup_key is not None:
                # Stored before publishing: a crash after publishing re-publishes, never reruns.
                await self.dedup.complete(request.dedup_key, encode_result(result))
            await self.sink.emit(request, result)
            if self.on_result is not None:
                await self.on_result(request, result)
            log.info(
                "run_finished",
                status=result.status,
                attempts=len(result.attempts),
                duration_ms=round(result.duration_ms, 3),
                total_ms=round((time.perf_counter() - t0) * 1000, 3),
                error=result.error.message if result.error else None,
            )
        return {"run_id": result.run_id, "status": result.status}


def register_run_task(
    broker: AsyncBroker, executor: RunExecutor
) -> AsyncTaskiqDecoratedTask[[dict[str, Any]], dict[str, Any]]:
    """Register ``run_pipeline`` on this broker only."""

    async def run_pipeline(request: dict[str, Any]) -> dict[str, Any]:
        return await executor(request)

    task = broker.register_task(run_pipeline, task_name=TASK_NAME)
    return cast("AsyncTaskiqDecoratedTask[[dict[str, Any]], dict[str, Any]]", task)
