"""Idempotency: a trigger's ``dedup_key`` keeps a redelivered message from running twice.

Locally (``queue.broker: memory``) keys live in SQLite in the state
directory (stdlib ``sqlite3``, used from a worker thread), so they survive a
crash: a message redelivered after a SIGKILL finds its key and gets the
earlier result re-published instead of a second run. A key whose run never
finished (the process died mid-run) is forgotten at start-up, so that
message runs again: at-least-once wins over at-most-once. Keys expire after
the trigger's ``dedup_ttl``.

With the queue on Redis the keys live in Redis next to the queue
(:class:`RedisDedupStore`, ``<queue_name>:dedup:<key>``), shared by every
daemon and worker. There the *worker* claims a key when it starts a run,
not the daemon when it enqueues: a daemon that dies between claiming and
enqueueing (or whose enqueue fails) would otherwise leave a key that no run
will ever complete, and the redelivered message would be dropped as a
duplicate. A claim by the same run id succeeds again, so a run reclaimed
from a dead worker runs (and completes its key). The daemon only looks keys
up (:class:`RedisDedupLookup`): a duplicate of a finished run gets the
earlier result without a trip through the queue; any other message is
enqueued and the worker decides.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import anyio.to_thread
import structlog

from ..settings import QueueSettings, RedisTarget, Settings
from .stores import RedisClient, RedisStore, SqliteStore, open_sqlite

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = [
    "DEFAULT_TTL",
    "DedupStore",
    "RedisDedupLookup",
    "RedisDedupStore",
    "SqliteDedupStore",
    "dedup_prefix",
    "dedup_store_for",
    "render_key",
]

log = structlog.get_logger("flowerpower_daemon.dedup")
DEFAULT_TTL = 3600.0

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")
Claim = tuple[Literal["new", "running", "done"], bytes | None]


def render_key(template: str, values: Mapping[str, object]) -> str:
    """Fill ``{payload.msg_id}``, ``{device}``, ``{props.x}``; a KeyError names a missing one."""

    def lookup(match: re.Match[str]) -> str:
        current: object = values
        for part in match.group(1).split("."):
            if isinstance(current, Mapping) and part in current:
                current = current[part]
            else:
                raise KeyError(f"dedup_key {template!r}: no value for {{{match.group(1)}}}")
        return str(current)

    return _FIELD.sub(lookup, template)


class DedupStore(Protocol):
    """Seen keys with the finished run's encoded result."""

    async def claim(self, key: str, run_id: str, ttl: float) -> Claim:
        """``new`` (the caller runs it), ``running`` or ``done`` with the stored result."""
        ...

    async def complete(self, key: str, result: bytes) -> None:
        """Store the finished run's encoded result (before it is published)."""
        ...

    async def forget(self, key: str) -> None:
        """Drop a claim whose run never finished, so that a redelivery runs again."""
        ...


class SqliteDedupStore(SqliteStore):
    """Seen keys with their finished result; one connection, used from one thread at a time."""

    def __init__(self, path: Path, *, max_keys: int = 1_000_000) -> None:
        self.path = path
        self.max_keys = max_keys
        self._lock = anyio.Lock()
        self._writes = 0

    def _open(self) -> None:
        db = open_sqlite(
            self.path,
            "CREATE TABLE IF NOT EXISTS dedup (key TEXT PRIMARY KEY, run_id TEXT NOT NULL,"
            " expires REAL NOT NULL, result BLOB);",
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


# Hash ``run`` (the claiming run id) + ``result`` (once finished), with the key's TTL.
# A key held by another run is ``running``; held by the same run (a reclaimed
# delivery of it) it is claimed again.
_CLAIM = """
local run = redis.call('HGET', KEYS[1], 'run')
if run then
  local result = redis.call('HGET', KEYS[1], 'result')
  if result then return {'done', result} end
  if run ~= ARGV[1] then return {'running'} end
end
redis.call('HSET', KEYS[1], 'run', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'new'}
"""

# A run longer than its TTL finds its key gone: store the result with a fresh expiry.
_COMPLETE = """
redis.call('HSET', KEYS[1], 'result', ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_FORGET = """
if redis.call('HEXISTS', KEYS[1], 'result') == 0 then redis.call('DEL', KEYS[1]) end
return 1
"""


def dedup_prefix(queue: QueueSettings) -> str:
    """Redis keys of the dedup store: ``<queue_name>:dedup:<trigger>:<key>``."""
    return f"{queue.queue_name}:dedup"


class RedisDedupStore(RedisStore):
    """Keys at ``<prefix>:<key>`` in Redis, shared by daemons and workers; one client.

    ``claim`` is one Lua script (check, claim and expiry at once, and the
    earlier result when there is one), ``complete`` stores the encoded result.
    Errors are the caller's (``redis.RedisError``, ``OSError``).
    """

    def __init__(
        self, url: RedisTarget | str, prefix: str, *, default_ttl: float = DEFAULT_TTL
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.default_ttl = default_ttl

    # Registered on each new client by _scripts.
    _claim: AsyncScript
    _complete: AsyncScript
    _forget: AsyncScript

    def _scripts(self, redis: RedisClient) -> None:
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._forget = redis.register_script(_FORGET)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def claim(self, key: str, run_id: str, ttl: float) -> Claim:
        """``new`` (the caller runs it; also for ``run_id``'s own key), ``running`` or ``done``."""
        out = await self._claim(keys=[self._key(key)], args=[run_id, _ms(ttl)])
        state = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
        if state == "done":
            return "done", bytes(out[1])
        return ("running", None) if state == "running" else ("new", None)

    async def complete(self, key: str, result: bytes) -> None:
        await self._complete(keys=[self._key(key)], args=[result, _ms(self.default_ttl)])

    async def forget(self, key: str) -> None:
        await self._forget(keys=[self._key(key)])

    async def result(self, key: str) -> bytes | None:
        """The stored result of ``key``'s finished run, if any."""
        raw = await self._redis.hget(self._key(key), "result")
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else raw.encode()


class RedisDedupLookup(RedisDedupStore):
    """The daemon's side of :class:`RedisDedupStore`: looks keys up, claims nothing.

    A key whose run finished is ``done`` (the dispatcher re-publishes the
    result and acks); anything else is ``new``: the request is enqueued with its
    key and the worker that takes it claims the key (or finds it taken). A
    lookup that fails is ``new`` too: the worker still decides.
    """

    async def claim(self, key: str, run_id: str, ttl: float) -> Claim:
        try:
            earlier = await self.result(key)
        except Exception as exc:  # redis.RedisError, OSError ...
            log.warning("dedup_lookup_failed", dedup_key=key, error=str(exc))
            return "new", None
        return ("done", earlier) if earlier is not None else ("new", None)

    async def forget(self, key: str) -> None:
        """Nothing to forget: this side never claims."""


def dedup_store_for(settings: Settings) -> AbstractAsyncContextManager[DedupStore]:
    """The daemon's store: SQLite in the state dir, or a Redis lookup when workers run the runs."""
    if settings.queue.is_redis:
        return RedisDedupLookup(settings.queue.redis, dedup_prefix(settings.queue))
    return SqliteDedupStore(settings.state_path / "dedup.sqlite3")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
