"""The FlowerPower keys accepted here without effect, and the one warning each gets.

A file FlowerPower wrote validates here whole (see :mod:`.fpkeys`), but a
few of its keys ask for something this daemon does not do. :data:`NO_EFFECT`
names each with the reason (the README's table mirrors it);
:func:`warn_no_effect` logs one warning per process for each such key in
each file that sets it to anything but a harmless value: every file that
asks for it is named (a user fixes them one by one), and a file loaded
again (a reload, a second command in the process) does not repeat it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

__all__ = ["NO_EFFECT", "NoEffect", "no_effect_keys", "warn_no_effect"]

log = structlog.get_logger("flowerpower_daemon.project.config")


def _empty(value: object) -> bool:
    return value is None or value == "" or value == {} or value == []


@dataclass(frozen=True, slots=True)
class NoEffect:
    """A FlowerPower key accepted here without effect, and why.

    ``key`` is the dotted path in the file (every ``adapter.*`` setting takes
    effect, so none is listed).
    ``harmless`` tells the values that ask for nothing we do not do anyway
    (the defaults FlowerPower writes): those stay silent.
    """

    key: str
    reason: str
    harmless: Callable[[object], bool] = _empty


#: Every FlowerPower key accepted without effect (the README's table mirrors this).
NO_EFFECT: tuple[NoEffect, ...] = (
    NoEffect(
        "hooks_dir",
        "hooks are read from hooks/<pipeline>/hook.py here",
        lambda v: v is None or str(v).strip("/") in ("hooks", "./hooks"),
    ),
    NoEffect(
        "job_queue",
        "the daemon queues runs itself (queue: in its config); FlowerPower's "
        "RQ/APScheduler job queue is not used",
        lambda v: (
            _empty(v)
            or (isinstance(v, Mapping) and set(v) <= {"type"} and v.get("type") in (None, "taskiq"))
        ),
    ),
    NoEffect(
        "run.with_adapter.ray",
        "the flag adds no adapter here; run on Ray with run.executor.type: ray",
        lambda v: _empty(v) or v is False,
    ),
    NoEffect(
        "run.adapter",
        "adapter objects can only be passed from Python (FlowerPower's run(adapter=...))",
    ),
    NoEffect(
        "run.async_driver",
        "the driver is chosen from the module here (async when it has async def nodes)",
    ),
)


def _lookup(data: object, path: tuple[str, ...]) -> tuple[bool, object]:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return False, None
        data = data[part]
    return True, data


def no_effect_keys(data: Mapping[str, object]) -> Iterator[tuple[str, str]]:
    """``(key path, reason)`` of each key of one file's YAML that is accepted without effect."""
    for entry in NO_EFFECT:
        path = tuple(entry.key.split("."))
        found, value = _lookup(data, path)
        if found and not entry.harmless(value):
            yield entry.key, entry.reason


#: ``(file, key)`` pairs already warned about in this process.
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_no_effect(data: Mapping[str, object], file: str) -> None:
    """Log a warning for each key of ``data`` without effect here, once per process for
    each ``file`` and key."""
    for key, reason in no_effect_keys(data):
        with _warned_lock:
            if (file, key) in _warned:
                continue
            _warned.add((file, key))
        log.warning(
            "config_key_has_no_effect",
            message=f"{file}: {key}: accepted, has no effect here: {reason}",
            file=file,
            key=key,
            reason=reason,
        )


def _forget_warnings() -> None:
    """Let every warning of :func:`warn_no_effect` be logged again (for tests)."""
    with _warned_lock:
        _warned.clear()
