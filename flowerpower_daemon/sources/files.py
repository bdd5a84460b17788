"""File-change trigger: an async iterator of :class:`TriggerEvent`, built on ``watchfiles.awatch``.

``awatch`` runs the OS watcher (inotify, FSEvents, ...) in a worker thread
and hands over batches of ``(change, path)`` pairs; there is no polling loop
here. Within one batch, the changes of one path collapse into one event, so a
new file written in several steps is one ``added`` event, not ``added`` and
then ``modified``. Writes that continue after the batch closes (a slow copy)
arrive as later ``modified`` events: listen to ``added`` only, or write to a
temporary name and rename, for exactly one run per new file.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import threading
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from contextlib import aclosing
from typing import Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import structlog
from watchfiles import Change, awatch

from .base import TriggerEvent

__all__ = ["FILE_EVENTS", "FileEventKind", "file_events"]

FileEventKind = Literal["added", "modified", "deleted"]
FILE_EVENTS: tuple[FileEventKind, ...] = ("added", "modified", "deleted")

_CHANGE_NAMES: dict[Change, FileEventKind] = {
    Change.added: "added",
    Change.modified: "modified",
    Change.deleted: "deleted",
}

log = structlog.get_logger("flowerpower_daemon.triggers.files")


async def file_events(
    name: str,
    path: str,
    *,
    patterns: Sequence[str] = ("*",),
    recursive: bool = True,
    events: Collection[str] = ("added", "modified"),
    debounce_ms: int = 200,
    stop_event: anyio.Event | None = None,
    ready: Callable[[], None] | None = None,
) -> AsyncGenerator[TriggerEvent, None]:
    """Yield one :class:`TriggerEvent` per changed file under ``path`` that matches.

    A file matches when one of the fnmatch ``patterns`` matches its path
    relative to ``path`` (with ``/``) or its basename; ``*`` also matches
    ``/``. With ``recursive=False`` only direct children count. ``events``
    picks among ``added``, ``modified`` and ``deleted``. Directories are not
    reported, except when deleted (they can no longer be told apart).

    Each event has ``kind="file"``, ``inputs`` ``{"file_path": <absolute path>,
    "file_event": <event>}`` and the same in ``meta`` as ``path`` and ``event``.
    Changes of one path within a batch (at most ``debounce_ms`` long) become
    one event: ``deleted`` if the path is gone by then, else ``added`` if it
    was created in the batch, else ``modified``.

    ``ready`` is called once, in the iterating task, right before the OS
    watcher is installed with no suspension point in between: a task it wakes
    (or a ``TaskGroup.start`` it completes) runs after the watcher is in place,
    so every change made from there on is reported. Iteration ends
    when ``stop_event`` is set; cancelling it stops the watcher thread at its
    next 50 ms step, not after watchfiles' 5 s timeout. ``path`` (a directory,
    or a single file) must exist: a ``ValueError`` naming it otherwise, raised
    on the first iteration.
    """
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    events = {events} if isinstance(events, str) else set(events)
    unknown = sorted(events - set(FILE_EVENTS))
    if unknown:
        raise ValueError(f"file trigger {name!r}: unknown event(s) {unknown}; use {FILE_EVENTS}")
    if not patterns:
        raise ValueError(f"file trigger {name!r}: patterns must not be empty")
    if debounce_ms <= 0:
        raise ValueError(f"file trigger {name!r}: debounce_ms must be > 0, not {debounce_ms}")
    root = await anyio.Path(path).absolute()
    try:
        mode = (await root.stat()).st_mode
    except OSError:
        raise ValueError(f"file trigger {name!r}: path {str(root)!r} does not exist") from None
    base = str(root if stat.S_ISDIR(mode) else root.parent)
    accept = _path_filter(base, patterns, recursive)
    probe = _StopProbe(stop_event)
    watcher = awatch(
        str(root),
        watch_filter=accept,
        debounce=debounce_ms,
        step=min(50, debounce_ms),
        stop_event=probe,
        recursive=recursive,
    )
    async with aclosing(watcher):
        if ready is not None:
            # Advancing awatch installs the OS watcher synchronously, before its first
            # suspension point, so whatever ``ready`` wakes runs once the watcher exists.
            ready()
        async for batch in watcher:
            kinds: dict[str, set[FileEventKind]] = {}
            for change, changed in batch:
                kinds.setdefault(changed, set()).add(_CHANGE_NAMES[change])
            on_disk = await anyio.to_thread.run_sync(_file_types, sorted(kinds))
            for changed, seen in sorted(kinds.items()):
                event = _collapse(seen, on_disk[changed])
                if event is None or event not in events:
                    continue
                log.debug("file_event", trigger=name, path=changed, file_event=event)
                yield TriggerEvent(
                    trigger=name,
                    kind="file",
                    inputs={"file_path": changed, "file_event": event},
                    meta={"path": changed, "event": event},
                )
    # A cancelled watch ends ``awatch`` like a stop; let the cancellation surface here.
    await anyio.lowlevel.checkpoint()


def _path_filter(
    base: str, patterns: tuple[str, ...], recursive: bool
) -> Callable[[Change, str], bool]:
    """The ``watch_filter`` for ``awatch``: glob on relative path or basename, depth rule."""

    def accept(change: Change, changed: str) -> bool:
        rel = os.path.relpath(changed, base)
        if rel.startswith(os.pardir):
            return False
        if not recursive and os.sep in rel:
            return False
        rel = rel.replace(os.sep, "/")
        name = os.path.basename(changed)
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)

    return accept


def _file_types(paths: list[str]) -> dict[str, Literal["file", "dir"] | None]:
    """What each path is now (runs in a worker thread: it stats the disk)."""
    result: dict[str, Literal["file", "dir"] | None] = {}
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            result[path] = None
        else:
            result[path] = "dir" if stat.S_ISDIR(mode) else "file"
    return result


def _collapse(seen: set[FileEventKind], now: Literal["file", "dir"] | None) -> FileEventKind | None:
    """One event for all the changes of one path in a batch; ``None`` to skip a directory."""
    if now == "dir":
        return None
    if len(seen) == 1:
        return next(iter(seen))
    if now is None:
        return "deleted"
    return "added" if "added" in seen else "modified"


class _StopProbe:
    """The ``stop_event`` handed to ``awatch``: its watcher thread polls ``is_set()`` each step.

    Besides the caller's ``stop_event`` it answers "stop" once the task that
    awaits the thread has been cancelled. ``awatch`` waits for its thread
    without abandoning it, so without this a cancelled watch would linger
    until watchfiles' own 5 s timeout.
    """

    def __init__(self, stop_event: anyio.Event | None) -> None:
        self._stop_event = stop_event
        self._stopped = threading.Event()
        self._cancelled_exc = anyio.get_cancelled_exc_class()

    def is_set(self) -> bool:
        if self._stopped.is_set() or (self._stop_event is not None and self._stop_event.is_set()):
            return True
        try:
            anyio.from_thread.check_cancelled()
        except self._cancelled_exc:
            return True
        return False

    def set(self) -> None:
        self._stopped.set()
