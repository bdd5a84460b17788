"""The job tracker: runs that are scheduled, queued or running, and what happens when they end.

Every run passes through :meth:`JobTracker.run` (around the taskiq ``kiq``
call) and, once finished, :meth:`JobTracker.finished` (the
executor's result hook), which records it in the history, publishes a
``run_finished`` event and wakes anyone waiting for it
(``flowerpowerctl run --wait``). A run that ends without a result was
cancelled (``flowerpowerctl cancel``, overlap ``replace``, shutdown): it is
recorded, published on MQTT and announced as ``cancelled``.

Manual runs from the control socket (:meth:`JobTracker.submit`) may start
later (``--run-in``/``--run-at``); they wait in the daemon's run task group
and are cancellable while waiting. When the daemon stops, those still
waiting are let go without a result (:meth:`JobTracker.suspend_scheduled`):
the daemon keeps them in its state dir and submits them again at its next
start (``service/controls.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

from ..control.api import JobSummary
from ..control.events import EventBus
from ..mqtt.sinks import ResultSink
from ..observe.metrics import NO_METRICS
from ..project.models import ErrorInfo, RunRequest, RunResult, utcnow
from ..state.history import JobHistory

__all__ = ["ActiveJob", "JobTracker"]

log = structlog.get_logger("flowerpower_daemon.jobs")

ActiveState = Literal["scheduled", "queued", "running"]
T = TypeVar("T")


@dataclass(eq=False)
class ActiveJob:
    """A run that has not finished yet."""

    request: RunRequest
    state: ActiveState
    run_at: datetime | None = None
    started_at: datetime | None = None
    scope: anyio.CancelScope | None = None  # the whole manual job (waiting included)
    run_scope: anyio.CancelScope | None = None  # the run itself
    cancelled_by: str | None = field(default=None)
    suspended: bool = False  # let go at shutdown, to be submitted again at the next start

    @property
    def run_id(self) -> str:
        return self.request.run_id

    def summary(self) -> JobSummary:
        return {
            "run_id": self.run_id,
            "pipeline": self.request.pipeline,
            "trigger": {"name": self.request.trigger.name, "type": self.request.trigger.type},
            "state": self.state,
            "queued_at": self.request.queued_at.isoformat(),
            "run_at": self.run_at.isoformat() if self.run_at else None,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": None,
            "duration_ms": None,
            "attempts": 0,
            "error": None,
        }


class JobTracker:
    """Knows every unfinished run of this daemon and settles each one exactly once."""

    def __init__(
        self,
        history: JobHistory | None,
        events: EventBus,
        *,
        sink: ResultSink | None = None,
        remote: bool = False,
    ) -> None:
        self.history = history
        self.events = events
        self.sink = sink
        self.remote = remote
        self.metrics = NO_METRICS  # the daemon sets its own (metrics on: http.listen)
        self.active: dict[str, ActiveJob] = {}
        self._waiters: dict[str, anyio.Event] = {}
        self._results: dict[str, RunResult] = {}

    # --------------------------------------------------------- every run

    async def run(self, request: RunRequest, call: Callable[[], Awaitable[T]]) -> T | None:
        """``await call()`` (the taskiq ``kiq``) as the run: mark it started, settle it if
        it ends without a result; ``None`` when it was cancelled (``flowerpowerctl
        cancel``). A plain coroutine, not a context manager: this is once per run."""
        job = self.active.get(request.run_id)
        if job is None:
            job = self.active[request.run_id] = ActiveJob(request, "running")
        job.state = "queued" if self.remote else "running"
        job.started_at = utcnow()
        if self.events.subscribers:  # no event built for nobody (once per run)
            self.events.publish(
                "run_enqueued" if self.remote else "run_started",
                run_id=request.run_id,
                pipeline=request.pipeline,
                trigger=request.trigger.to_dict(),
            )
        try:
            with anyio.CancelScope() as job.run_scope:
                return await call()
            return None
        except Exception as exc:
            if not self.remote:  # with Redis the message is not acked: it comes again
                await self.settle(request.run_id, _could_not_run(job, exc))
            raise
        finally:
            if self.remote:
                self.active.pop(request.run_id, None)
            else:
                await self.settle_cancelled(request.run_id)

    async def finished(self, request: RunRequest, result: RunResult) -> None:
        """The result hook: record, announce, wake waiters."""
        self.active.pop(request.run_id, None)
        self.metrics.run_finished(request, result)
        if self.history is not None:
            await self.history.record(result)
        if self.events.subscribers:
            self.events.publish(
                "run_finished",
                run_id=result.run_id,
                pipeline=result.pipeline,
                trigger=result.trigger.to_dict(),
                status=result.status,
                duration_ms=round(result.duration_ms, 3),
                error=result.error.to_dict() if result.error else None,
            )
        waiter = self._waiters.pop(result.run_id, None)
        if waiter is not None:
            self._results[result.run_id] = result
            waiter.set()

    async def settle_cancelled(self, run_id: str) -> None:
        """Record a run that ended without a result as cancelled (no-op once settled)."""
        job = self.active.get(run_id)
        if job is None:
            return
        reason = job.cancelled_by or "cancelled before it finished"
        await self.settle(run_id, _cancelled(job.request, job.started_at, reason))

    async def settle(self, run_id: str, result: RunResult) -> None:
        """Publish and record ``result`` for a run that produced none (no-op once settled)."""
        job = self.active.get(run_id)
        if job is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            if self.sink is not None:
                try:
                    await self.sink.emit(job.request, result)
                except Exception:
                    log.exception("settled_result_not_published", run_id=run_id)
            await self.finished(job.request, result)

    # -------------------------------------------------------- manual runs

    def submit(
        self,
        request: RunRequest,
        execute: Callable[[RunRequest], Awaitable[None]],
        runs: TaskGroup,
        *,
        run_at: datetime | None = None,
    ) -> ActiveJob:
        """Start a manual run in ``runs`` (now, or at ``run_at``); returns at once."""
        job = ActiveJob(
            request, "scheduled" if run_at else "queued", run_at=run_at, scope=anyio.CancelScope()
        )
        self.active[request.run_id] = job
        self.events.publish(
            "run_scheduled" if run_at else "run_queued",
            run_id=request.run_id,
            pipeline=request.pipeline,
            run_at=run_at.isoformat() if run_at else None,
        )
        runs.start_soon(self._manual, job, execute, name=f"manual:{request.run_id}")
        return job

    async def _manual(
        self, job: ActiveJob, execute: Callable[[RunRequest], Awaitable[None]]
    ) -> None:
        assert job.scope is not None
        try:
            with job.scope:
                if job.run_at is not None:
                    await _sleep_until(job.run_at)
                    job.state = "queued"
                await execute(job.request)
        except Exception:
            log.exception("manual_run_failed", run_id=job.run_id)
            job.cancelled_by = "the daemon failed to start the run (see its log)"
        finally:
            if job.suspended:
                self.active.pop(job.run_id, None)
            else:
                await self.settle_cancelled(job.run_id)

    def cancel(self, run_id: str, reason: str = "cancelled by flowerpowerctl") -> bool:
        """Cancel a scheduled, queued or running run; False when it is not active."""
        job = self.active.get(run_id)
        if job is None or (job.scope is None and job.run_scope is None):
            return False
        job.cancelled_by = reason
        for scope in (job.scope, job.run_scope):
            if scope is not None:
                scope.cancel()
        return True

    def suspend_scheduled(self) -> int:
        """At shutdown: stop waiting for manual runs whose time has not come, recording
        nothing (they are kept in the state dir and come back at the next start)."""
        waiting = [j for j in self.active.values() if j.state == "scheduled"]
        for job in waiting:
            job.suspended = True
            if job.scope is not None:
                job.scope.cancel()
        return len(waiting)

    async def wait(self, run_id: str) -> RunResult | None:
        """The result of an active run once it finishes; None when it is not active."""
        if run_id not in self.active:
            return self._results.pop(run_id, None)
        event = self._waiters.setdefault(run_id, anyio.Event())
        try:
            await event.wait()
        finally:
            if not event.is_set():
                self._waiters.pop(run_id, None)
        return self._results.pop(run_id, None)


def _could_not_run(job: ActiveJob, exc: Exception) -> RunResult:
    """The queue refused or lost the run (the pipeline did not fail: its hand-over did)."""
    error = ErrorInfo(type(exc).__name__, f"could not run: {exc}", None, False)
    return RunResult.not_run(job.request, "failed", error, started=job.started_at, exception=exc)


def _cancelled(request: RunRequest, started: datetime | None, reason: str) -> RunResult:
    error = ErrorInfo("Cancelled", reason, None, False)
    return RunResult.not_run(request, "cancelled", error, started=started)


async def _sleep_until(when: datetime) -> None:
    """Sleep until the wall clock reaches ``when`` (re-checked after every wake)."""
    while (remaining := (when - utcnow()).total_seconds()) > 0:  # noqa: ASYNC110 - wall clock
        await anyio.sleep(min(remaining, 300.0))
