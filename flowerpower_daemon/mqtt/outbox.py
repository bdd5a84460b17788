"""The MQTT outbox: results waiting while the broker is unreachable, kept on disk.

SQLite (stdlib ``sqlite3``) in the state directory, ``<state_dir>/outbox.sqlite3``,
so a daemon restart keeps unsent results; they go out after the next connect,
oldest first. Bounded by ``mqtt.outbox_size``: beyond it the oldest are
dropped, logged and counted.

Only the disconnected path touches the disk; a connected publish never does.
The event loop never does either: every database call runs in a worker
thread, one at a time (a capacity limiter of one, as in ``history.py``).
:meth:`Outbox.put` returns once the message is committed (group commit:
messages queued while a write is running share the next transaction, so a
burst costs one commit per batch, not per message).

``path=None`` keeps the outbox in memory (same code, nothing survives a
restart): for ``flowerpower-daemon worker`` processes, which may share a
state directory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
import structlog

from ..state.stores import open_sqlite

__all__ = ["Outbox", "OutgoingMessage"]

log = structlog.get_logger("flowerpower_daemon.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    topic          TEXT NOT NULL,
    payload        BLOB NOT NULL,
    qos            INTEGER NOT NULL,
    retain         INTEGER NOT NULL,
    correlation    BLOB,
    response_topic TEXT,
    user_props     BLOB
);
"""

_Row = tuple[str, bytes, int, int, bytes | None, str | None, bytes | None]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish: topic, payload, QoS, retain and the MQTT v5 properties kept."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _Batch:
    rows: list[_Row] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    ok: bool = False


def _row(msg: OutgoingMessage) -> _Row:
    props = orjson.dumps([list(p) for p in msg.user_properties]) if msg.user_properties else None
    return (
        msg.topic,
        bytes(msg.payload),
        int(msg.qos),
        int(msg.retain),
        msg.correlation_data,
        msg.response_topic,
        props,
    )


def _message(row: Sequence[object]) -> OutgoingMessage:
    topic, payload, qos, retain, corr, response_topic, props = row
    assert isinstance(topic, str) and isinstance(payload, bytes)
    assert isinstance(qos, int) and isinstance(retain, int)
    pairs: tuple[tuple[str, str], ...] = ()
    if isinstance(props, bytes):
        pairs = tuple((str(k), str(v)) for k, v in orjson.loads(props))
    return OutgoingMessage(
        topic,
        payload,
        qos=qos,
        retain=bool(retain),
        correlation_data=corr if isinstance(corr, bytes) else None,
        response_topic=response_topic if isinstance(response_topic, str) else None,
        user_properties=pairs,
    )


class Outbox:
    """A bounded FIFO of :class:`OutgoingMessage` in SQLite (or in memory with ``path=None``)."""

    def __init__(self, path: Path | None, *, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.path = path
        self.max_size = max_size
        self.dropped = 0  # the oldest, dropped because the outbox was full
        self.failed = 0  # could not be written (disk full, ...): lost
        self._count = 0
        self._db: sqlite3.Connection | None = None
        self._lane = anyio.CapacityLimiter(1)
        self._batch = _Batch()
        self._writing = False

    def __len__(self) -> int:
        """Messages waiting (kept in memory: reading it touches no disk)."""
        return self._count

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else ":memory:"

    # ------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Outbox:
        await anyio.to_thread.run_sync(self._conn, limiter=self._lane)
        if self._count:
            log.info("mqtt_outbox_loaded", waiting=self._count, path=self.location)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.move_on_after(10, shield=True):
            await anyio.to_thread.run_sync(self._close, limiter=self._lane)

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
        else:
            # Only the disconnected path writes, in batches: afford an fsync per commit.
            db = open_sqlite(self.path, _SCHEMA, synchronous="FULL")
        self._db = db
        self._count = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        if self._count > self.max_size:  # the bound was lowered since the last run
            self._trim(self._count - self.max_size)
        return db

    def _close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _conn(self) -> sqlite3.Connection:
        return self._db if self._db is not None else self._open()

    # --------------------------------------------------------------- writing

    async def put(self, msg: OutgoingMessage) -> bool:
        """Queue ``msg``; returns once it is committed (False if it could not be written)."""
        batch = self._batch
        batch.rows.append(_row(msg))
        if not self._writing:
            # This caller writes every queued batch; the others wait for theirs.
            self._writing = True
            try:
                with anyio.CancelScope(shield=True):
                    while self._batch.rows:
                        current, self._batch = self._batch, _Batch()
                        try:
                            current.ok = await anyio.to_thread.run_sync(
                                self._write, current.rows, limiter=self._lane
                            )
                        finally:
                            current.done.set()
            except BaseException:
                pending, self._batch = self._batch, _Batch()
                pending.done.set()  # nobody writes these now: release their callers
                raise
            finally:
                self._writing = False
        await batch.done.wait()
        return batch.ok

    def _write(self, rows: list[_Row]) -> bool:
        """One transaction: append ``rows``, drop the oldest beyond the bound (worker thread)."""
        try:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO outbox (topic, payload, qos, retain, correlation,"
                    " response_topic, user_props) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                excess = self._count + len(rows) - self.max_size
                dropped = self._drop_oldest(db, excess) if excess > 0 else 0
        except (sqlite3.Error, OSError) as exc:
            self.failed += len(rows)
            log.error(
                "mqtt_outbox_write_failed", error=str(exc), lost=len(rows), path=self.location
            )
            return False
        self._count += len(rows) - dropped
        if dropped:
            self.dropped += dropped
            log.error("mqtt_outbox_full_dropped_oldest", dropped=dropped, size=self.max_size)
        return True

    def _drop_oldest(self, db: sqlite3.Connection, n: int) -> int:
        cur = db.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (n,)
        )
        return max(0, cur.rowcount)

    def _trim(self, n: int) -> None:
        assert self._db is not None
        with self._db:
            dropped = self._drop_oldest(self._db, n)
        self._count -= dropped
        self.dropped += dropped
        log.error("mqtt_outbox_full_dropped_oldest", dropped=dropped, size=self.max_size)

    # --------------------------------------------------------------- reading

    async def peek(self, limit: int, *, after: int = 0) -> list[tuple[int, OutgoingMessage]]:
        """The oldest ``limit`` messages with an id above ``after``, oldest first, as (id, msg)."""
        return await anyio.to_thread.run_sync(self._peek, limit, after, limiter=self._lane)

    def _peek(self, limit: int, after: int) -> list[tuple[int, OutgoingMessage]]:
        try:
            rows = (
                self._conn()
                .execute(
                    "SELECT id, topic, payload, qos, retain, correlation, response_topic,"
                    " user_props FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after, limit),
                )
                .fetchall()
            )
        except (sqlite3.Error, OSError) as exc:
            log.error("mqtt_outbox_read_failed", error=str(exc), path=self.location)
            return []
        return [(int(row[0]), _message(row[1:])) for row in rows]

    async def remove(self, ids: Sequence[int]) -> None:
        """Forget messages that were sent."""
        if ids:
            await anyio.to_thread.run_sync(self._remove, list(ids), limiter=self._lane)

    def _remove(self, ids: list[int]) -> None:
        try:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                removed = db.executemany(
                    "DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]
                ).rowcount
        except (sqlite3.Error, OSError) as exc:
            # They stay and go out again after the next connect: at least once.
            log.error("mqtt_outbox_remove_failed", error=str(exc), path=self.location)
            return
        self._count -= max(0, removed)
