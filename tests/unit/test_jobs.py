"""The job tracker settles a run that produced no result: a failed hand-over is 'failed'
with the reason, a cancelled run is 'cancelled'."""

from __future__ import annotations

import anyio
import pytest

from flowerpower_daemon.control.events import EventBus
from flowerpower_daemon.project.models import RunRequest, RunResult
from flowerpower_daemon.service.jobs import JobTracker


class _Collected:
    """A result sink that keeps what it is given (the MQTT sink's interface)."""

    def __init__(self) -> None:
        self.results: list[RunResult] = []

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        self.results.append(result)


async def test_a_run_the_queue_refused_is_failed_with_the_reason() -> None:
    sink = _Collected()
    jobs = JobTracker(None, EventBus(), sink=sink)
    request = RunRequest("stats")
    async def refused() -> None:
        raise RuntimeError("queue down")

    with pytest.raises(RuntimeError, match="queue down"):
        await jobs.run(request, refused)
    [result] = sink.results
    assert result.status == "failed"
    assert result.error is not None and result.error.message == "could not run: queue down"
    assert request.run_id not in jobs.active


async def test_a_cancelled_run_is_cancelled_once() -> None:
    sink = _Collected()
    jobs = JobTracker(None, EventBus(), sink=sink)
    request = RunRequest("stats")
    with anyio.CancelScope() as scope:

        async def cancelled() -> None:
            scope.cancel()
            await anyio.sleep(1)

        await jobs.run(request, cancelled)
    assert [r.status for r in sink.results] == ["cancelled"]
