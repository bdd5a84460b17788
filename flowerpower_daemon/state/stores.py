"""What the daemon's state stores share: opening a SQLite file, a Redis client's life.

The SQLite stores (job history, dedup keys, timer state, outbox) each keep
one file in the state directory, opened the same way: owner-only (0600), WAL
journal (readers never block the writer), a busy timeout, the schema created
if missing. The
Redis stores (dedup keys, timer state, run ledger, history) each hold one
client, opened by ``async with`` and closed, shielded from cancellation, on
the way out. :func:`open_redis` makes every Redis client of the daemon from
``queue.broker`` (one server, a Sentinel-managed master, a Cluster); the
stream broker's clients come from :func:`connection_kwargs`,
:func:`sentinel_for` and :func:`cluster_for` too.

Redis Cluster: a command, ``MULTI`` or Lua script that touches several keys
needs them in one hash slot. Each store's script touches one key; the
history's keys share the hash tag ``{<queue_name>}`` (see
:mod:`.history`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Self, TypedDict, Union, Unpack

import anyio

from ..settings import RedisTarget, parse_broker

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.sentinel import Sentinel

#: A client of ``queue.broker``: one server's or a Sentinel-managed master's, or a Cluster's.
RedisClient = Union["Redis", "RedisCluster"]

__all__ = [
    "ClientOptions",
    "RedisClient",
    "RedisConnection",
    "RedisStore",
    "SqliteStore",
    "cluster_for",
    "connection_kwargs",
    "open_redis",
    "open_sqlite",
    "redis_target",
    "sentinel_for",
]


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


def redis_target(where: RedisTarget | str) -> RedisTarget:
    """``where`` itself, or the target of a broker URL (``queue.broker``)."""
    return where if isinstance(where, RedisTarget) else parse_broker(where)


def connection_kwargs(target: RedisTarget) -> dict[str, object]:
    """redis-py's connection arguments from ``target.url`` (credentials, db, TLS, options),
    without the address: for a Sentinel-managed master (``ssl`` instead of a connection class)."""
    from redis.asyncio.connection import parse_url

    kwargs: dict[str, object] = dict(parse_url(target.url))
    for key in ("host", "port", "path", "connection_class"):
        kwargs.pop(key, None)
    if target.tls:
        kwargs["ssl"] = True
    return kwargs


def sentinel_for(target: RedisTarget) -> Sentinel:
    """A Sentinel client over ``target.nodes``; ``master_for(target.master)`` is the master."""
    from redis.asyncio.sentinel import Sentinel

    kwargs = connection_kwargs(target)
    sentinel_kwargs: dict[str, object] = {
        k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl"))
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    return Sentinel(
        sentinels=list(target.nodes),
        min_other_sentinels=0,
        sentinel_kwargs=sentinel_kwargs,
        force_master_ip=None,
        **kwargs,
    )


def cluster_for(target: RedisTarget, **options: Unpack[ClientOptions]) -> RedisCluster:
    """A Redis Cluster client that starts from any of ``target.nodes``."""
    from redis.asyncio import RedisCluster
    from redis.asyncio.cluster import ClusterNode

    others = [ClusterNode(host, port) for host, port in target.nodes[1:]]
    return RedisCluster.from_url(target.url, startup_nodes=others or None, **options)


class RedisConnection:
    """One client for ``queue.broker`` and what :meth:`aclose` must close with it."""

    def __init__(self, client: RedisClient, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self._sentinel = sentinel

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                await node.aclose()


class ClientOptions(TypedDict, total=False):
    """Connection options over those of the URL."""

    socket_timeout: float | None


def open_redis(where: RedisTarget | str, **options: Unpack[ClientOptions]) -> RedisConnection:
    """The client for ``where``: one server, the Sentinel-managed master, or a Cluster.

    Nothing is connected yet (redis-py connects on the first command); a
    Sentinel client asks the sentinels for the master on every new connection,
    so it follows a failover. ``options`` override the URL's connection
    options (e.g. ``socket_timeout``).
    """
    target = redis_target(where)
    if target.mode == "cluster":
        return RedisConnection(cluster_for(target, **options))
    if target.mode == "sentinel":
        sentinel = sentinel_for(target)
        return RedisConnection(sentinel.master_for(target.master, **options), sentinel)
    import redis.asyncio as aioredis

    return RedisConnection(aioredis.Redis.from_url(target.url, **options))


class RedisStore:
    """One Redis client for ``url`` (a :class:`RedisTarget` or a broker URL), opened by
    ``async with``; :meth:`_scripts` registers a subclass's Lua scripts on it."""

    url: RedisTarget | str
    #: Connection options over the URL's, for :func:`open_redis`.
    client_options: ClassVar[ClientOptions] = {}
    _client: RedisClient | None = None
    _connection: RedisConnection | None = None

    @property
    def _redis(self) -> RedisClient:
        """The open client (only inside ``async with``)."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{type(self).__name__} is used outside 'async with'")
        return client

    async def __aenter__(self) -> Self:
        self._connection = open_redis(self.url, **self.client_options)
        self._client = self._connection.client
        self._scripts(self._client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            with anyio.move_on_after(5, shield=True):
                await self._connection.aclose()
            self._connection = self._client = None

    def _scripts(self, redis: RedisClient) -> None:
        """Register Lua scripts on a new client (none by default)."""
