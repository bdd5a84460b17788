"""What the tracking adapters (Hamilton UI, MLflow) need to know about the run in progress.

Hamilton builds a driver, and its adapters, once per pipeline setup and
shares it between runs, but the Hamilton UI run and the MLflow run each need
this run's trigger, run id and name. The runner :func:`bind`\\ s the request
to a context variable before it executes; the adapters read it back with
:func:`current` in their before-run hooks, which run in the caller's context
(threads started by the runner copy it). Light on purpose: the runner imports
this module for every run, the adapters themselves are imported only when
switched on (:mod:`.uitracker`, :mod:`.mlflowtracker`).
"""

from __future__ import annotations

import string
from contextvars import ContextVar
from datetime import datetime

from .models import RunRequest, utcnow

__all__ = [
    "RUN_NAME_PLACEHOLDERS",
    "bind",
    "check_run_name",
    "current",
    "fill_run_name",
    "run_tags",
]

_current: ContextVar[RunRequest | None] = ContextVar("flowerpower_run_request", default=None)

#: The placeholders ``adapter.mlflow.run_name`` may use, and what each becomes.
RUN_NAME_PLACEHOLDERS: dict[str, str] = {
    "pipeline_name": "the pipeline's name (also {pipeline})",
    "pipeline": "the pipeline's name",
    "timestamp": "the start time in UTC, 20261206T224200Z (strftime codes after a colon: "
    "{timestamp:%Y%m%d_%H%M%S})",
    "run_id": "the daemon's run id",
    "trigger": "the trigger's name (manual for pipeline run)",
    "trigger_type": "mqtt, cron, interval, date, file or manual",
}


def bind(request: RunRequest) -> None:
    """Make ``request`` the run in progress for this context (the runner calls it per run)."""
    _current.set(request)


def current() -> RunRequest | None:
    """The run in progress in this context, if the runner bound one."""
    return _current.get()


def run_tags(request: RunRequest | None) -> dict[str, str]:
    """The tags a tracked run gets from the daemon: its run id and what triggered it.

    Strings only (the Hamilton UI refuses other tag values); no request (a
    driver used outside the runner) gives no tags.
    """
    if request is None:
        return {}
    trigger = request.trigger
    tags = {
        "flowerpower_run_id": request.run_id,
        "trigger": trigger.name,
        "trigger_type": trigger.type,
    }
    if trigger.topic is not None:
        tags["trigger_topic"] = trigger.topic
    if trigger.file_path is not None:
        tags["trigger_file"] = trigger.file_path
    if trigger.scheduled is not None:
        tags["trigger_scheduled"] = trigger.scheduled
    return tags


class _Timestamp:
    """A start time that formats as ``20261206T224200Z``, or by strftime codes after a colon."""

    __slots__ = ("_at",)

    def __init__(self, at: datetime) -> None:
        self._at = at

    def __format__(self, spec: str) -> str:
        return self._at.strftime(spec or "%Y%m%dT%H%M%SZ")


def fill_run_name(
    template: str, pipeline: str, request: RunRequest | None, now: datetime | None = None
) -> str:
    """``adapter.mlflow.run_name`` with its placeholders filled in for one run.

    ``{{`` and ``}}`` stand for literal braces, as in Python's ``str.format``.
    """
    values: dict[str, object] = {
        "pipeline_name": pipeline,
        "pipeline": pipeline,
        "timestamp": _Timestamp(now or utcnow()),
        "run_id": request.run_id if request is not None else "",
        "trigger": request.trigger.name if request is not None else "manual",
        "trigger_type": request.trigger.type if request is not None else "manual",
    }
    return template.format_map(values)


def check_run_name(template: str) -> str | None:
    """Why ``template`` is not a usable run name (unknown placeholder, bad braces), or None."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"{exc} (write {{{{ and }}}} for literal braces)"
    for field in fields:
        name = field.split(".", 1)[0].split("[", 1)[0]
        if name not in RUN_NAME_PLACEHOLDERS or name != field:
            known = ", ".join("{" + p + "}" for p in RUN_NAME_PLACEHOLDERS)
            return f"unknown placeholder {{{field}}}; known: {known}"
    try:
        fill_run_name(template, "p", None)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None
