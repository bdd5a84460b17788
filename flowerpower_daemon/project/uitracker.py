"""The Hamilton UI tracker (``hamilton_sdk``) as the daemon uses it: per-run tags and limits.

Imported only when ``with_adapter.hamilton_tracker`` is on (it imports the
SDK: ``pip install 'flowerpower-daemon[tracker]'``). Two things the SDK's
own ``HamiltonTracker`` cannot do for a daemon that shares one driver
between many runs are added here:

- **the trigger as tags**: the SDK sends ``base_tags`` with every run;
  here they are the configured tags plus :func:`.tracking.run_tags` of the
  run in progress (trigger name, type, topic; the daemon's run id), read
  from the context the runner bound, so concurrent runs each get their own.
- **the capture limits per pipeline**: the SDK reads ``capture_data_statistics``
  and the list/dict lengths from module globals of
  ``hamilton_sdk.tracking.constants``, one value per process. Those globals
  become properties reading a context variable that each tracker sets
  around its own result summaries, falling back to the process's values
  (the SDK's defaults, ``HAMILTON_*`` environment, ``~/.hamilton.conf``).

The SDK's per-run log lines (its clock at INFO, the run's URL twice at
WARNING) become DEBUG records, so a daemon's log is not a warning per run.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import requests
from hamilton_sdk import adapters as sdk_adapters
from hamilton_sdk.api import clients as sdk_clients
from hamilton_sdk.api import constants as sdk_api_constants
from hamilton_sdk.tracking import constants as sdk_constants

from ..errors import FlowerPowerError, InputError
from .adapters import HamiltonTrackerConfig
from .tracking import current, run_tags

__all__ = ["HTTP_TIMEOUT", "CaptureLimits", "HamiltonUIError", "tracker"]


class HamiltonUIError(FlowerPowerError, ConnectionError):
    """The Hamilton UI could not be reached, or refused the project or the user, when the
    tracker checked them (as a pipeline's driver is built)."""


@dataclass(frozen=True, slots=True)
class CaptureLimits:
    """What a tracker records of node results (FlowerPower's ``capture_*`` keys)."""

    CAPTURE_DATA_STATISTICS: bool
    MAX_LIST_LENGTH_CAPTURE: int
    MAX_DICT_LENGTH_CAPTURE: int

    @classmethod
    def of(cls, settings: HamiltonTrackerConfig) -> CaptureLimits:
        return cls(
            settings.capture_data_statistics,
            settings.max_list_length_capture,
            settings.max_dict_length_capture,
        )


_limits: ContextVar[CaptureLimits | None] = ContextVar("hamilton_capture_limits", default=None)


def _limit(name: str) -> property:
    """A module attribute that is the running tracker's limit, else the module's own value."""

    def get(module: types.ModuleType) -> object:
        limits = _limits.get()
        return module.__dict__[name] if limits is None else getattr(limits, name)

    def put(module: types.ModuleType, value: object) -> None:
        module.__dict__[name] = value

    return property(get, put)


class _PerRunConstants(types.ModuleType):
    """``hamilton_sdk.tracking.constants`` with the capture limits of the tracker at work."""

    CAPTURE_DATA_STATISTICS = _limit("CAPTURE_DATA_STATISTICS")
    MAX_LIST_LENGTH_CAPTURE = _limit("MAX_LIST_LENGTH_CAPTURE")
    MAX_DICT_LENGTH_CAPTURE = _limit("MAX_DICT_LENGTH_CAPTURE")


_patch_lock = threading.Lock()

#: What the SDK logs for every run: its clock and status (INFO) and, twice, the run's URL
#: (WARNING). Per-run chatter in a daemon's log; DEBUG, shown when the daemon logs DEBUG.
_PER_RUN = ("Clocked ", "Updating run status", "Capturing execution run", "Captured execution run")


class _PerRunToDebug(logging.Filter):
    """Turns the SDK's per-run messages into DEBUG records (dropped unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg.lstrip().startswith(_PER_RUN):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


#: (connect, read) seconds for each call of the SDK's sync client to the UI. The SDK sets
#: none, so a UI that accepts connections but does not answer held a run, and the
#: daemon's start (drivers are built before it comes online), forever.
HTTP_TIMEOUT: tuple[float, float] = (10.0, 30.0)


class _TimedRequests:
    """``requests`` as the SDK's client module sees it: each call has a timeout."""

    def __getattr__(self, name: str) -> Any:
        return getattr(requests, name)

    def _call(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return requests.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._call("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._call("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> requests.Response:
        return self._call("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> requests.Response:
        return self._call("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> requests.Response:
        return self._call("DELETE", url, **kwargs)


sdk_clients.requests = _TimedRequests()


def _quiet_per_run_logs() -> None:
    for name in ("hamilton_sdk.adapters", "hamilton_sdk.tracking.runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PerRunToDebug) for f in logger.filters):
            logger.addFilter(_PerRunToDebug())


_quiet_per_run_logs()


def _patch_constants() -> None:
    with _patch_lock:
        if not isinstance(sdk_constants, _PerRunConstants):
            sdk_constants.__class__ = _PerRunConstants


class _DaemonTags:
    """``base_tags`` as the SDK reads them: the configured tags plus the run's own."""

    _tags: dict[str, str]

    @property
    def base_tags(self) -> dict[str, str]:
        return {**self._tags, **run_tags(current())}

    @base_tags.setter
    def base_tags(self, value: dict[str, str]) -> None:
        self._tags = value


class DaemonTracker(_DaemonTags, sdk_adapters.HamiltonTracker):  # type: ignore[misc]
    """``HamiltonTracker`` with the trigger tags and this pipeline's capture limits."""

    capture: CaptureLimits

    def post_node_execute(self, *args: Any, **kwargs: Any) -> None:
        token = _limits.set(self.capture)
        try:
            super().post_node_execute(*args, **kwargs)
        finally:
            _limits.reset(token)


class AsyncDaemonTracker(_DaemonTags, sdk_adapters.AsyncHamiltonTracker):  # type: ignore[misc]
    """``AsyncHamiltonTracker`` with the trigger tags and this pipeline's capture limits."""

    capture: CaptureLimits

    async def post_node_execute(self, *args: Any, **kwargs: Any) -> None:
        token = _limits.set(self.capture)
        try:
            done: Awaitable[None] = super().post_node_execute(*args, **kwargs)
            await done
        finally:
            _limits.reset(token)


def tracker(
    settings: HamiltonTrackerConfig, pipeline: str, is_async: bool
) -> DaemonTracker | AsyncDaemonTracker:
    """The tracker adapter for one pipeline's driver (the sync tracker checks the project now).

    ``project_id`` and ``username`` are required: the UI files every run
    under a project, and a user must be allowed to write to it.
    """
    missing = [k for k in ("project_id", "username") if getattr(settings, k) is None]
    if missing:
        raise InputError(
            f"pipeline {pipeline!r}: with_adapter.hamilton_tracker needs "
            + " and ".join(f"adapter.hamilton_tracker.{k}" for k in missing)
            + " (in conf/project.yml or the pipeline's YAML)"
        )
    _patch_constants()
    kwargs: dict[str, Any] = {
        "project_id": settings.project_id,
        "username": settings.username,
        "dag_name": settings.dag_name or pipeline,
        "tags": dict(settings.tags),
        "api_key": settings.api_key,
        "verify": settings.verify,
    }
    # Unset, the SDK's own defaults apply (HAMILTON_API_URL / HAMILTON_UI_URL, else its cloud).
    if settings.api_url is not None:
        kwargs["hamilton_api_url"] = settings.api_url
    if settings.ui_url is not None:
        kwargs["hamilton_ui_url"] = settings.ui_url
    made: DaemonTracker | AsyncDaemonTracker
    if is_async:
        if kwargs["api_key"] is None:
            del kwargs["api_key"]  # the async tracker's default reads HAMILTON_API_KEY
        made = AsyncDaemonTracker(**kwargs)
    else:
        made = _checked(pipeline, settings, kwargs)
    made.capture = CaptureLimits.of(settings)
    return made


def _checked(
    pipeline: str, settings: HamiltonTrackerConfig, kwargs: dict[str, Any]
) -> DaemonTracker:
    """The sync tracker, which asks the UI for the user and the project as it is made.

    Its failures become one line naming the UI's address and the key to look at;
    otherwise they read as a Hamilton graph that does not build.
    """
    url = (
        settings.api_url or os.environ.get("HAMILTON_API_URL") or sdk_api_constants.HAMILTON_API_URL
    )
    where = f"pipeline {pipeline!r}: with_adapter.hamilton_tracker"
    try:
        return DaemonTracker(**kwargs)
    except requests.RequestException as exc:
        raise HamiltonUIError(
            f"{where}: the Hamilton UI at {url} cannot be reached ({type(exc).__name__}); "
            "is it running? (adapter.hamilton_tracker.api_url)"
        ) from exc
    except sdk_clients.ResourceDoesNotExistException as exc:
        raise HamiltonUIError(
            f"{where}: the Hamilton UI at {url} has no project "
            f"{settings.project_id} that {settings.username} may use "
            "(adapter.hamilton_tracker.project_id, username; create it in the UI)"
        ) from exc
    except sdk_clients.UnauthorizedException as exc:
        raise HamiltonUIError(
            f"{where}: the Hamilton UI at {url} refused user {settings.username} "
            "(adapter.hamilton_tracker.username, api_key)"
        ) from exc
