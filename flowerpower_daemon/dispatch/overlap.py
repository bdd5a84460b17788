"""Policy ``overlap`` (and ``max_concurrent``): what a trigger's new run does to its running ones.

``allow`` runs side by side (up to ``max_concurrent``); ``queue`` runs one
at a time, in turn (a limiter of 1); ``skip`` refuses a message while a run
of the trigger is under way (the admission stage :data:`SKIP_WHILE_RUNNING`);
``replace`` cancels the running ones, whose results say ``cancelled``
(:func:`cancel_running`, :func:`run_replaceable`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ..project.models import RunRequest
from .chain import Admission, Rejection, Trigger, TriggerState

__all__ = [
    "SKIP_WHILE_RUNNING",
    "SkipWhileRunning",
    "cancel_running",
    "limiter_for",
    "run_replaceable",
]

Kiq = Callable[[RunRequest], Awaitable[object]]


class SkipWhileRunning:
    """``overlap: skip``: no new run while one of the trigger's runs is under way."""

    __slots__ = ()

    async def __call__(self, admission: Admission) -> Rejection | None:
        running = admission.state.running
        if not running:
            return None
        return Rejection("skipped", log="run_skipped_overlap", detail={"running": list(running)})


SKIP_WHILE_RUNNING = SkipWhileRunning()


def limiter_for(cfg: Trigger) -> anyio.CapacityLimiter | None:
    """The trigger's own run limit: 1 for ``overlap: queue``, else ``max_concurrent``."""
    limit = 1 if cfg.overlap == "queue" else cfg.max_concurrent
    return anyio.CapacityLimiter(limit) if limit else None


def cancel_running(state: TriggerState) -> None:
    """``overlap: replace``: cancel the trigger's runs under way (before taking any limit)."""
    for older in list(state.running.values()):
        if older is not None:
            older.cancel()


async def run_replaceable(state: TriggerState, request: RunRequest, kiq: Kiq) -> bool:
    """Run ``request`` so that the next run can cancel it; True when one did.

    The caller holds the trigger's and the daemon's limits, and takes the run
    out of ``state.running`` when it ends. Runs of other triggers need no
    cancel scope: they are kept in ``state.running`` as ``None``.
    """
    with anyio.CancelScope() as scope:
        state.running[request.run_id] = scope
        await kiq(request)
    return scope.cancelled_caught
