"""An exclusive lock held by a running process on a file that names its pid (``flock``).

The kernel drops an ``flock`` when its process exits, however it exits, so a
lock file left by a daemon that crashed is free again; the pid written into
it is only there to say who holds it while it is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import FlowerPowerError

__all__ = ["LockHeld", "StateDirInUse", "hold", "hold_state_dir", "release"]


class LockHeld(Exception):
    """Another running process holds the lock; ``owner`` is the pid it wrote ("?" if none)."""

    def __init__(self, path: Path, owner: str) -> None:
        super().__init__(f"{path} is held by pid {owner}")
        self.path = path
        self.owner = owner


def hold(path: Path) -> int:
    """Take ``path``'s lock without waiting and write this process's pid into it; return
    the descriptor that holds it (give it to :func:`release`). :class:`LockHeld` if another
    process holds it, ``OSError`` if the file cannot be opened (created ``0600``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockHeld(path, owner) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Let go of a lock :func:`hold` took (the pid is wiped first)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


class StateDirInUse(FlowerPowerError):
    """Another running daemon has this state dir (its SQLite files, outbox, schedules)."""


@contextlib.contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold ``<state_dir>/daemon.lock`` for the block: one daemon per state dir.

    Two daemons on one state dir would share the outbox, the dedup keys, the
    timer state and the schedules, each overwriting the other's, whatever
    their control sockets; the second refuses to start instead.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = hold(state_dir / "daemon.lock")
    except LockHeld as exc:
        raise StateDirInUse(
            f"state dir {str(state_dir)!r} is in use by another running daemon (pid"
            f" {exc.owner}); stop it first, or give this one its own state_dir"
        ) from None
    except OSError as exc:
        raise StateDirInUse(f"cannot lock state dir {str(state_dir)!r}: {exc}") from exc
    try:
        yield
    finally:
        release(fd)
