"""Manual runs (``flowerpowerctl run``): now, or later and persisted until then.

A manual run replies on the configured result topic like a trigger's run.
One with a time (``--run-in``/``--run-at``) is written to the state dir
(``schedules.json``, "delayed") before it is accepted and removed once it
starts or is cancelled; a daemon stopped before its time lets it go without
recording anything (:meth:`JobTracker.suspend_scheduled
<flowerpower_daemon.service.jobs.JobTracker.suspend_scheduled>`), and the
next one submits it again at start-up: at once when its time has passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

import anyio
import structlog
from anyio.abc import TaskGroup

from ..control.api import JobState
from ..project.models import RunRequest, TriggerInfo
from ..settings import MqttSettings
from ..state.schedules import DelayedRun, ScheduleStore
from .jobs import JobTracker

__all__ = ["ManualRuns"]

log = structlog.get_logger("flowerpower_daemon.daemon")


class ManualRuns:
    """Builds, submits, persists and resumes ``flowerpowerctl run`` runs."""

    def __init__(self, jobs: JobTracker, store: ScheduleStore) -> None:
        self.jobs = jobs
        self.store = store
        self._execute: Callable[[RunRequest], Awaitable[None]] | None = None
        self._runs: TaskGroup | None = None

    def attach(self, execute: Callable[[RunRequest], Awaitable[None]], runs: TaskGroup) -> None:
        """Runs go to ``execute`` (the dispatcher), in the ``runs`` task group."""
        self._execute, self._runs = execute, runs

    @property
    def attached(self) -> bool:
        return self._runs is not None

    @staticmethod
    def request(
        mqtt: MqttSettings,
        pipeline: str,
        inputs: Mapping[str, object],
        overrides: Mapping[str, object],
    ) -> RunRequest:
        """A manual run request that replies on the configured result/error topics."""
        from ..mqtt.sinks import reply_target

        request = RunRequest(
            pipeline=pipeline,
            inputs=inputs,
            overrides=overrides,
            trigger=TriggerInfo(name="manual", type="manual"),
        )
        reply = reply_target(
            pipeline=pipeline,
            trigger="manual",
            run_id=request.run_id,
            fields={},
            result_topic=mqtt.result_topic,
            error_topic=mqtt.error_topic,
        )
        return dataclasses.replace(request, reply=reply)

    async def submit(self, request: RunRequest, run_at: datetime | None) -> JobState:
        """Start ``request`` now, or persist it and start it at ``run_at``."""
        if run_at is not None:
            self.store.delayed[request.run_id] = DelayedRun(request, run_at)
            try:
                await self.store.save()
            except BaseException:  # not kept: it must not reach the file with a later save
                self.store.delayed.pop(request.run_id, None)
                raise
        return self._submit(request, run_at)

    def resume(self) -> int:
        """At start-up: submit the delayed runs a previous daemon left (due ones run now)."""
        for delayed in list(self.store.delayed.values()):
            self._submit(delayed.request, delayed.run_at)
            log.info(
                "delayed_run_resumed",
                run_id=delayed.request.run_id,
                pipeline=delayed.request.pipeline,
                run_at=delayed.run_at.isoformat(),
            )
        return len(self.store.delayed)

    async def cancel(self, run_id: str) -> bool:
        """Cancel an active run (and forget it if it was waiting); False if not active."""
        if not self.jobs.cancel(run_id):
            return False
        await self._forget(run_id)
        return True

    def _submit(self, request: RunRequest, run_at: datetime | None) -> JobState:
        assert self._runs is not None
        return self.jobs.submit(request, self._start, self._runs, run_at=run_at).state

    async def _start(self, request: RunRequest) -> None:
        """A run's time has come: it is no longer a delayed run, it runs."""
        assert self._execute is not None
        await self._forget(request.run_id)
        await self._execute(request)

    async def _forget(self, run_id: str) -> None:
        if self.store.delayed.pop(run_id, None) is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.store.save()
                except OSError as exc:  # the run goes on; the file forgets it at the next save
                    log.error("delayed_run_forget_failed", run_id=run_id, error=str(exc))
