"""The last fire time of every timer trigger, kept across restarts, and one fire per tick.

At start-up a timer reads its last fire time here to catch up the fire
times it missed while the daemon was down (see
:func:`~flowerpower_daemon.sources.timers.catch_up_fires`); every fire
records its scheduled time. An interval trigger without ``start_at`` that
never fired stores its start time (:meth:`anchor`), so that its grid
survives a restart and every daemon sharing the store ticks on the same
grid. Locally the times live in SQLite in the state
directory (stdlib ``sqlite3``, used from a worker thread, as
:mod:`.dedup`); with ``queue.broker`` on Redis they live in a Redis hash
next to the queue (on the memory queue, in the Redis ``shared_state`` names),
so several daemons share them, and :meth:`claim` takes a
Redis lock per trigger and fire time (``SET NX`` with an expiry), so only
one of those daemons fires each tick.

A store error is logged, never raised: a timer whose last fire cannot be
read starts fresh, a fire whose time cannot be recorded still runs, and a
fire whose lock cannot be taken runs too (at least once beats not at all;
with Redis down the enqueue fails anyway).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.to_thread
import structlog

from ..settings import RedisTarget, Settings
from .stores import RedisClient, RedisStore, SqliteStore, open_sqlite

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisTimerState", "SqliteTimerState", "TimerState", "lock_ttl", "timer_state_for"]

log = structlog.get_logger("flowerpower_daemon.timerstate")

# Keep the stored time only when it is newer: fires may be recorded out of order.
_RECORD_MAX = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or tonumber(current) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""


def lock_ttl(misfire_grace: float | None) -> int:
    """Seconds a tick's lock lives: as long as another daemon could still fire that tick.

    A fire later than ``misfire_grace`` never runs, so the grace plus a minute
    covers it; without a grace, an hour (a later catch-up sees the shared last
    fire time instead). Capped at a day.
    """
    grace = 3600.0 if misfire_grace is None else misfire_grace
    return int(min(86400.0, max(60.0, grace + 60.0)))


class TimerState(Protocol):
    """Last fire times per trigger, plus the per-tick lock (a no-op without Redis)."""

    async def last_fire(self, name: str) -> datetime | None: ...

    async def anchor(self, name: str, now: datetime) -> datetime: ...

    async def record(self, name: str, fired: datetime) -> None: ...

    async def claim(self, name: str, fire: datetime, ttl: float) -> bool: ...


class SqliteTimerState(SqliteStore):
    """``<state_dir>/timers.sqlite3``: one row per trigger; one connection, one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = anyio.Lock()

    def _open(self) -> None:
        self._db = open_sqlite(
            self.path,
            "CREATE TABLE IF NOT EXISTS timers (name TEXT PRIMARY KEY, last_fire REAL NOT NULL);",
        )

    async def last_fire(self, name: str) -> datetime | None:
        try:
            async with self._lock:
                ts = await anyio.to_thread.run_sync(self._get, name)
        except sqlite3.Error as exc:
            log.error("timer_state_read_failed", trigger=name, error=str(exc))
            return None
        return None if ts is None else datetime.fromtimestamp(ts, UTC)

    def _get(self, name: str) -> float | None:
        assert self._db is not None
        row = self._db.execute("SELECT last_fire FROM timers WHERE name = ?", (name,)).fetchone()
        return None if row is None else float(row[0])

    async def anchor(self, name: str, now: datetime) -> datetime:
        """The last fire time; when there is none, store ``now`` and return it."""
        try:
            async with self._lock:
                ts = await anyio.to_thread.run_sync(self._setdefault, name, now.timestamp())
        except sqlite3.Error as exc:
            log.error("timer_state_write_failed", trigger=name, error=str(exc))
            return now
        return datetime.fromtimestamp(ts, UTC)

    def _setdefault(self, name: str, ts: float) -> float:
        assert self._db is not None
        self._db.execute("INSERT OR IGNORE INTO timers (name, last_fire) VALUES (?, ?)", (name, ts))
        stored = self._get(name)
        return ts if stored is None else stored

    async def record(self, name: str, fired: datetime) -> None:
        try:
            async with self._lock:
                await anyio.to_thread.run_sync(self._set, name, fired.timestamp())
        except sqlite3.Error as exc:
            log.error("timer_state_write_failed", trigger=name, error=str(exc))

    def _set(self, name: str, ts: float) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO timers (name, last_fire) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
            " SET last_fire = max(last_fire, excluded.last_fire)",
            (name, ts),
        )

    async def claim(self, name: str, fire: datetime, ttl: float) -> bool:
        """Always ``True``: one daemon per state directory (the control socket sees to that)."""
        return True


class RedisTimerState(RedisStore):
    """Last fire times in the hash ``<prefix>``, tick locks at ``<prefix>:lock:<name>:<time>``."""

    def __init__(self, url: RedisTarget | str, prefix: str, owner: str | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"

    # Registered on each new client by _scripts.
    _record: AsyncScript

    def _scripts(self, redis: RedisClient) -> None:
        self._record = redis.register_script(_RECORD_MAX)

    async def last_fire(self, name: str) -> datetime | None:
        try:
            raw = await self._redis.hget(self.prefix, name)
        except Exception as exc:  # redis.RedisError, OSError ...
            log.error("timer_state_read_failed", trigger=name, error=str(exc))
            return None
        return None if raw is None else datetime.fromtimestamp(float(raw), UTC)

    async def anchor(self, name: str, now: datetime) -> datetime:
        """The last fire time; when there is none, store ``now`` (the first daemon wins)."""
        try:
            await self._redis.hsetnx(self.prefix, name, repr(now.timestamp()))
            raw = await self._redis.hget(self.prefix, name)
        except Exception as exc:
            log.error("timer_state_write_failed", trigger=name, error=str(exc))
            return now
        return now if raw is None else datetime.fromtimestamp(float(raw), UTC)

    async def record(self, name: str, fired: datetime) -> None:
        try:
            await self._record(keys=[self.prefix], args=[name, repr(fired.timestamp())])
        except Exception as exc:
            log.error("timer_state_write_failed", trigger=name, error=str(exc))

    async def claim(self, name: str, fire: datetime, ttl: float) -> bool:
        """``True`` for the one daemon that takes this tick's lock (or when Redis fails)."""
        key = f"{self.prefix}:lock:{name}:{fire.timestamp()!r}"
        try:
            return bool(await self._redis.set(key, self.owner, nx=True, ex=max(1, int(ttl))))
        except Exception as exc:
            log.error("timer_lock_failed", trigger=name, error=str(exc))
            return True


def timer_state_for(settings: Settings) -> AbstractAsyncContextManager[TimerState]:
    """SQLite in the state dir, or Redis (:attr:`Settings.shared_redis`: the queue's, or
    ``shared_state``) for daemons that share their timers."""
    redis = settings.shared_redis
    if redis is not None:
        return RedisTimerState(redis, prefix=f"{settings.queue.queue_name}:timers")
    return SqliteTimerState(settings.state_path / "timers.sqlite3")
