"""The SQLite state files (timer state, dedup keys) are the owner's only, like the others."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flowerpower_daemon.state.dedup import SqliteDedupStore
from flowerpower_daemon.state.timerstate import SqliteTimerState


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable (0644) and directories 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
async def test_timer_state_file_is_0600(tmp_path: Path) -> None:
    """timers.sqlite3 (and its WAL files) is created 0600 in a 0700 directory, whatever the umask."""
    path = tmp_path / "state" / "timers.sqlite3"
    async with SqliteTimerState(path) as state:
        await state.record("t", datetime(2026, 1, 1, tzinfo=UTC))
        assert await state.last_fire("t") == datetime(2026, 1, 1, tzinfo=UTC)
        for journal in ("-wal", "-shm"):  # SQLite gives them the database file's mode
            assert _mode(path.with_name(path.name + journal)) == 0o600
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


@pytest.mark.usefixtures("open_umask")
async def test_dedup_file_is_0600(tmp_path: Path) -> None:
    """dedup.sqlite3 (it holds finished results) is created 0600 too."""
    path = tmp_path / "dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        await store.claim("k", "run-1", 60.0)
    assert _mode(path) == 0o600


async def test_readable_state_file_of_an_older_version_is_narrowed(tmp_path: Path) -> None:
    """A timers.sqlite3 left 0644 by an earlier version is 0600 once opened."""
    path = tmp_path / "timers.sqlite3"
    path.touch()
    path.chmod(0o644)
    async with SqliteTimerState(path):
        pass
    assert _mode(path) == 0o600
