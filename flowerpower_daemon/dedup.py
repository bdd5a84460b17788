"""Idempotency: a trigger's ``dedup_key`` keeps a redelivered message from running twice.

Keys live in SQLite in the state directory (stdlib ``sqlite3``, used from a
worker thread), so they survive a crash: a message redelivered after a
SIGKILL finds its key and gets the earlier result re-published instead of
a second run. A key whose run never finished (the process died mid-run) is
forgotten at start-up, so that message runs again: at-least-once wins over
at-most-once. Keys expire after the trigger's ``dedup_ttl``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread

__all__ = ["DedupStore", "render_key"]

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")
Claim = tuple[Literal["new", "running", "done"], bytes | None]


def render_key(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``{payload.msg_id}``, ``{device}``, ``{props.x}``; a KeyError names a missing one."""

    def lookup(match: re.Match[str]) -> str:
        current: Any = values
        for part in match.group(1).split("."):
            if isinstance(current, Mapping) and part in current:
                current = current[part]
            else:
                raise KeyError(f"dedup_key {template!r}: no value for {{{match.group(1)}}}")
        return str(current)

    return _FIELD.sub(lookup, template)


class DedupStore:
    """Seen keys with their finished result; one connection, used from one thread at a time."""

    def __init__(self, path: Path, *, max_keys: int = 1_000_000) -> None:
        self.path = path
        self.max_keys = max_keys
        self._db: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        self._writes = 0

    async def __aenter__(self) -> DedupStore:
        await anyio.to_thread.run_sync(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS dedup (key TEXT PRIMARY KEY, run_id TEXT NOT NULL,"
            " expires REAL NOT NULL, result BLOB)"
        )
        # Runs of a previous process that never finished must run again.
        db.execute("DELETE FROM dedup WHERE result IS NULL OR expires < ?", (time.time(),))
        self._db = db

    async def claim(self, key: str, run_id: str, ttl: float) -> Claim:
        """``new`` (the caller runs it), ``running`` or ``done`` with the stored result."""
        async with self._lock:
            return await anyio.to_thread.run_sync(self._claim, key, run_id, ttl)

    def _claim(self, key: str, run_id: str, ttl: float) -> Claim:
        assert self._db is not None
        now = time.time()
        row = self._db.execute(
            "SELECT result FROM dedup WHERE key = ? AND expires >= ?", (key, now)
        ).fetchone()
        if row is not None:
            return ("done", bytes(row[0])) if row[0] is not None else ("running", None)
        self._db.execute(
            "INSERT OR REPLACE INTO dedup (key, run_id, expires, result) VALUES (?, ?, ?, NULL)",
            (key, run_id, now + ttl),
        )
        return "new", None

    async def complete(self, key: str, result: bytes) -> None:
        """Store the finished run's encoded result (before it is published)."""
        async with self._lock:
            await anyio.to_thread.run_sync(self._complete, key, result)

    def _complete(self, key: str, result: bytes) -> None:
        assert self._db is not None
        self._db.execute("UPDATE dedup SET result = ? WHERE key = ?", (result, key))
        self._writes += 1
        if self._writes % 1000 == 0:
            self._db.execute("DELETE FROM dedup WHERE expires < ?", (time.time(),))
            count = self._db.execute("SELECT count(*) FROM dedup").fetchone()[0]
            if count > self.max_keys:
                self._db.execute(
                    "DELETE FROM dedup WHERE key IN "
                    "(SELECT key FROM dedup ORDER BY expires LIMIT ?)",
                    (count - self.max_keys,),
                )

    async def forget(self, key: str) -> None:
        """Drop a claim whose run was never started (e.g. the enqueue failed)."""
        async with self._lock:
            await anyio.to_thread.run_sync(self._forget, key)

    def _forget(self, key: str) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM dedup WHERE key = ? AND result IS NULL", (key,))
