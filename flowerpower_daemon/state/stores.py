"""What the daemon's state stores share: opening a SQLite file, a Redis client's life.

The SQLite stores (job history, dedup keys, timer state, outbox) each keep
one file in the state directory, opened the same way: owner-only (0600), WAL
journal (readers never block the writer), a busy timeout, the schema created
if missing. The
Redis stores (dedup keys, timer state, run ledger, history) each hold one
client, opened by ``async with`` and closed, shielded from cancellation, on
the way out.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

import anyio

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStore", "SqliteStore", "open_sqlite"]


def open_sqlite(
    path: Path,
    schema: str,
    *,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
) -> sqlite3.Connection:
    """Open (creating) ``path`` for use from one thread at a time; blocking I/O.

    Every state file is the owner's only (0600, its directory 0700 when
    created here), whatever the umask: results, dedup keys and inputs may be
    sensitive. A file an earlier version left readable is narrowed too.
    SQLite gives its ``-wal`` and ``-shm`` files the database file's mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


class SqliteStore:
    """One SQLite connection, opened in a worker thread by ``async with``.

    Subclasses set ``path`` and implement :meth:`_open` (usually
    ``open_sqlite`` plus start-up clean-up) and use ``self._db`` from one
    thread at a time.
    """

    path: Path
    _db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close)

    def _open(self) -> None:
        raise NotImplementedError


class RedisStore:
    """One Redis client for ``url``, opened by ``async with``; :meth:`_scripts` registers
    a subclass's Lua scripts on it."""

    url: str
    _client: Redis | None = None

    @property
    def _redis(self) -> Redis:
        """The open client (only inside ``async with``)."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{type(self).__name__} is used outside 'async with'")
        return client

    async def __aenter__(self) -> Self:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(self.url)
        self._scripts(self._client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with anyio.move_on_after(5, shield=True):
                await self._client.aclose()
            self._client = None

    def _scripts(self, redis: Redis) -> None:
        """Register Lua scripts on a new client (none by default)."""
