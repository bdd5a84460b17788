"""Job history: every finished run, kept in SQLite in the state directory.

One row per run: id, pipeline, trigger, state, timings, attempts, error and
the result message (the JSON published on MQTT, capped at
``max_result_bytes`` with the documented ``truncated`` markers). The table is
bounded by count (``max_jobs``) and age (``max_age``), pruned as rows arrive.

The event loop never touches the disk: :meth:`SqliteHistory.record` queues a
row (waiting only when ``max_pending`` rows are queued: backpressure), and
the :meth:`SqliteHistory.run` task writes queued rows in batches gathered
for up to ``linger`` seconds, one transaction per batch, in a worker thread. Queries run in the same
one-at-a-time thread lane and first write whatever is queued, so a run is
visible as soon as its result is recorded. Runs still queued or running are
not here; the daemon's job tracker knows them.

With ``queue.broker`` on Redis the history is :class:`RedisHistory` instead,
so the runs that ``flowerpower-daemon worker`` processes execute on other
machines are visible to ``flowerpowerctl`` too. Its keys start with
``<queue_name>:history``; on a Redis Cluster with ``{<queue_name>}:history``
(a hash tag: one write touches the run's key and the index in one ``MULTI``,
one read ``MGET``s many runs, so they must all live in one hash slot).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, Self

import anyio
import anyio.to_thread
import orjson
import structlog
from anyio.abc import TaskStatus

from ..project.encoding import encode_result
from ..project.models import RunResult
from ..settings import QueueSettings, RedisTarget, Settings
from .batch import Replies, WriteBatch, WritePipeline
from .stores import RedisStore, open_sqlite, redis_target

__all__ = [
    "FINISHED_STATES",
    "JobHistory",
    "JobRecord",
    "RedisHistory",
    "SqliteHistory",
    "history_for",
    "history_prefix",
]

log = structlog.get_logger("flowerpower_daemon.history")

#: The Redis index is trimmed back to ``max_jobs`` once it is this many runs over (1 % of
#: ``max_jobs`` at most): one extra round trip per hundred runs instead of one per run.
_TRIM_BATCH = 100

FINISHED_STATES = ("success", "failed", "cancelled", "timeout")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    run_id        TEXT PRIMARY KEY,
    pipeline      TEXT NOT NULL,
    trigger_name  TEXT NOT NULL,
    trigger_type  TEXT NOT NULL,
    state         TEXT NOT NULL,
    queued_at     TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    finished_at   TEXT NOT NULL,
    finished_ts   REAL NOT NULL,
    duration_ms   REAL NOT NULL,
    attempts      INTEGER NOT NULL,
    error_type    TEXT,
    error_message TEXT,
    result        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (finished_ts);
CREATE INDEX IF NOT EXISTS jobs_by_pipeline ON jobs (pipeline, finished_ts);
"""

_COLUMNS = (
    "run_id, pipeline, trigger_name, trigger_type, state, queued_at, started_at, "
    "finished_at, finished_ts, duration_ms, attempts, error_type, error_message"
)

Row = tuple[object, ...]

JobRecord = dict[str, object]
"""One run as ``flowerpowerctl jobs`` and ``job`` show it (a JSON object)."""


class SqliteHistory:
    """The job history of one daemon, in ``<state_dir>/history.sqlite3``."""

    def __init__(
        self,
        path: Path,
        *,
        max_jobs: int = 10_000,
        max_age: timedelta = timedelta(days=7),
        max_result_bytes: int = 64 * 1024,
        max_pending: int = 10_000,
        prune_every: int = 500,
        linger: float = 0.1,
        batch_rows: int = 500,
    ) -> None:
        self.path = path
        self.max_jobs = max_jobs
        self.max_age = max_age
        self.max_result_bytes = max_result_bytes
        self.max_pending = max_pending
        self.prune_every = prune_every
        self.linger = linger
        self.batch_rows = batch_rows
        self.recorded = 0
        self._pending: list[Row] = []
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._lane = anyio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        self._since_prune = 0

    # ------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> SqliteHistory:
        await anyio.to_thread.run_sync(self._open, limiter=self._lane)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.move_on_after(10, shield=True):
            await anyio.to_thread.run_sync(self._close, limiter=self._lane)

    def _open(self) -> None:
        self._db = open_sqlite(self.path, _SCHEMA)
        self._prune()

    def _close(self) -> None:
        if self._db is None:
            return
        self._write_pending()
        self._db.close()
        self._db = None

    # --------------------------------------------------------------- writing

    async def record(self, result: RunResult) -> None:
        """Queue one finished run (waits only while ``max_pending`` rows are queued)."""
        while len(self._pending) >= self.max_pending:
            await self._drained.wait()
        self._pending.append(self._row(result))
        self._wake.set()

    @property
    def location(self) -> str:
        return str(self.path)

    def _row(self, result: RunResult) -> Row:
        return (*_fields(result), encode_result(result, max_bytes=self.max_result_bytes))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer task: writes queued rows in batches until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            if len(self._pending) < self.batch_rows:
                # Gather a batch: one thread hop and one transaction per ``linger`` under
                # load instead of per run. Reads flush first, so nobody sees the delay.
                await anyio.sleep(self.linger)
            self._wake = anyio.Event()
            await anyio.to_thread.run_sync(self._write_pending, limiter=self._lane)

    def _write_pending(self) -> None:
        """Write every queued row in one transaction (worker thread, inside the lane)."""
        batch = self._pending[:]
        if not batch or self._db is None:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    f"INSERT OR REPLACE INTO jobs ({_COLUMNS}, result) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    batch,
                )
        except sqlite3.Error as exc:
            # Rows stay queued for the next batch; a full disk must not kill the daemon.
            log.error("history_write_failed", error=str(exc), rows=len(batch), path=str(self.path))
            if len(self._pending) >= self.max_pending:
                del self._pending[: len(batch)]
                log.error("history_rows_dropped", rows=len(batch))
            return
        # The loop only appends to the list, so the first len(batch) rows are ours.
        del self._pending[: len(batch)]
        self.recorded += len(batch)
        self._since_prune += len(batch)
        if self._since_prune >= self.prune_every:
            self._prune()
        drained, self._drained = self._drained, anyio.Event()
        anyio.from_thread.run_sync(drained.set)

    def _prune(self) -> None:
        assert self._db is not None
        self._since_prune = 0
        cutoff = time.time() - self.max_age.total_seconds()
        with self._db:
            self._db.execute("DELETE FROM jobs WHERE finished_ts < ?", (cutoff,))
            self._db.execute(
                "DELETE FROM jobs WHERE run_id IN (SELECT run_id FROM jobs "
                "ORDER BY finished_ts DESC LIMIT -1 OFFSET ?)",
                (self.max_jobs,),
            )

    # --------------------------------------------------------------- reading

    async def recent(
        self, *, pipeline: str | None = None, states: Sequence[str] = (), limit: int = 20
    ) -> list[JobRecord]:
        """Newest first: summaries of finished runs (no result body)."""
        return await anyio.to_thread.run_sync(
            self._list, pipeline, tuple(states), limit, limiter=self._lane
        )

    def _list(self, pipeline: str | None, states: tuple[str, ...], limit: int) -> list[JobRecord]:
        self._write_pending()
        assert self._db is not None
        where, params = [], []
        if pipeline is not None:
            where.append("pipeline = ?")
            params.append(pipeline)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY finished_ts DESC LIMIT ?"
        rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [_summary(row) for row in rows]

    async def get(self, run_id: str) -> JobRecord | None:
        """One run with its full result message, or None."""
        return await anyio.to_thread.run_sync(self._get, run_id, limiter=self._lane)

    def _get(self, run_id: str) -> JobRecord | None:
        self._write_pending()
        assert self._db is not None
        row = self._db.execute(
            f"SELECT {_COLUMNS}, result FROM jobs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        out = _summary(row[:-1])
        out["result"] = orjson.loads(row[-1])
        return out

    async def count(self) -> int:
        return await anyio.to_thread.run_sync(self._count, limiter=self._lane)

    def _count(self) -> int:
        self._write_pending()
        assert self._db is not None
        return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def _iso(when: datetime) -> str:
    """``when.isoformat()``, the same text, written by orjson in a fifth of the time
    (three per run: ``isoformat`` formats its UTC offset through Python-level calls)."""
    return orjson.dumps(when)[1:-1].decode()


def _fields(result: RunResult) -> Row:
    """The columns of one run, in ``_COLUMNS`` order."""
    error = result.error
    return (
        result.run_id,
        result.pipeline,
        result.trigger.name,
        result.trigger.type,
        result.status,
        _iso(result.queued_at),
        _iso(result.started_at),
        _iso(result.finished_at),
        result.finished_at.timestamp(),
        round(result.duration_ms, 3),
        len(result.attempts),
        error.type if error else None,
        error.message if error else None,
    )


def _summary(row: Row) -> JobRecord:
    (
        run_id,
        pipeline,
        trigger_name,
        trigger_type,
        state,
        queued_at,
        started_at,
        finished_at,
        _ts,
        duration_ms,
        attempts,
        error_type,
        error_message,
    ) = row
    return {
        "run_id": run_id,
        "pipeline": pipeline,
        "trigger": {"name": trigger_name, "type": trigger_type},
        "state": state,
        "queued_at": queued_at,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_ms": duration_ms,
        "attempts": attempts,
        "error": {"type": error_type, "message": error_message} if error_type else None,
    }


# ------------------------------------------------------------------- Redis


class JobHistory(Protocol):
    """What the daemon and the control socket need from a history store."""

    recorded: int

    @property
    def location(self) -> str: ...

    async def record(self, result: RunResult) -> None: ...

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...

    async def recent(
        self, *, pipeline: str | None = None, states: Sequence[str] = (), limit: int = 20
    ) -> list[JobRecord]: ...

    async def get(self, run_id: str) -> JobRecord | None: ...

    async def count(self) -> int: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class RedisHistory(RedisStore):
    """The job history in Redis, shared by the daemon and every worker (``queue.broker`` Redis).

    Each run is its result message (JSON, as published, capped at
    ``max_result_bytes``) at ``<prefix>:job:<run_id>`` that expires after
    ``max_age``; the sorted set ``<prefix>:jobs`` (score: finish time) orders
    them. Past ``max_jobs`` (by a batch of a hundred) the oldest runs go, keys and
    all. Writes go straight to Redis (one pipelined round trip per run, no thread),
    or, in a worker, with its other writes (:attr:`batch`).
    """

    def __init__(
        self,
        url: RedisTarget | str,
        *,
        prefix: str = "flowerpower:history",
        max_jobs: int = 10_000,
        max_age: timedelta = timedelta(days=7),
        max_result_bytes: int = 64 * 1024,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.max_jobs = max_jobs
        self.max_age = max_age
        self.max_result_bytes = max_result_bytes
        self.recorded = 0
        self._since_prune = self.prune_every - 1  # the first batched run checks

    @property
    def location(self) -> str:
        return f"{redis_target(self.url).display} ({self.prefix})"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Nothing to write in the background (writes are direct); kept for symmetry."""
        task_status.started()

    #: Set by a worker: records go out with its other writes (:class:`.batch.WriteBatch`),
    #: the index checked against ``max_jobs`` and ``max_age`` every ``prune_every`` runs.
    batch: WriteBatch | None = None

    @property
    def prune_every(self) -> int:
        """Runs between two checks of the index when batched (as the trim slack, <= 100)."""
        return max(1, min(_TRIM_BATCH, self.max_jobs // 100))

    async def record(self, result: RunResult) -> None:
        """Store one finished run; a Redis error is logged, never raised (the run is done)."""
        # The result message as published (encoded once, for MQTT); reads make the summary.
        blob = encode_result(result, max_bytes=self.max_result_bytes)
        ttl = max(1, int(self.max_age.total_seconds()))
        index = f"{self.prefix}:jobs"
        if self.batch is not None:
            self._send(result, blob, ttl, index)
            return
        now = time.time()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.prefix}:job:{result.run_id}", blob, ex=ttl)
                pipe.zadd(index, {result.run_id: result.finished_at.timestamp()})
                pipe.zremrangebyscore(index, "-inf", now - ttl)
                pipe.zcard(index)
                *_, count = await pipe.execute()
            if count > self.max_jobs + min(_TRIM_BATCH, self.max_jobs // 100):
                await self._drop_oldest(index)
        except Exception as exc:  # redis.RedisError, OSError ...
            log.error("history_write_failed", error=str(exc), run_id=result.run_id)
            return
        self.recorded += 1

    def _send(self, result: RunResult, blob: bytes, ttl: int, index: str) -> None:
        """Queue the run's key and index entry on the batch; every ``prune_every`` runs also
        the age cut and the count, trimmed (:meth:`_trim`) once past ``max_jobs`` + slack."""
        assert self.batch is not None
        key, run_id = f"{self.prefix}:job:{result.run_id}", result.run_id
        ts = result.finished_at.timestamp()
        self._since_prune += 1
        prune = self._since_prune >= self.prune_every
        if prune:
            self._since_prune = 0

        def stage(pipe: WritePipeline) -> None:
            # Commands as such: redis-py's builders check their options at every call.
            pipe.execute_command("SET", key, blob, "EX", ttl)
            pipe.execute_command("ZADD", index, ts, run_id)
            if prune:
                pipe.zremrangebyscore(index, "-inf", time.time() - ttl)
                pipe.zcard(index)

        self.batch.send(stage, "history_write_failed", self._recorded)

    def _recorded(self, replies: Replies) -> None:
        self.recorded += 1
        if len(replies) == 4:
            count = int(replies[-1])
            if count > self.max_jobs + min(_TRIM_BATCH, self.max_jobs // 100):
                self._trim(f"{self.prefix}:jobs")

    def _trim(self, index: str) -> None:
        """Batched :meth:`_drop_oldest`: read which runs are past ``max_jobs``, then drop them."""
        assert self.batch is not None
        batch, prefix = self.batch, self.prefix

        def drop(replies: Replies) -> None:
            ids = [_text(i) for i in replies[0]]
            if not ids:
                return
            keys = [f"{prefix}:job:{i}" for i in ids]

            def stage(pipe: WritePipeline) -> None:
                pipe.delete(*keys)
                pipe.zrem(index, *ids)

            batch.send(stage, "history_write_failed")

        stale = -(self.max_jobs + 1)
        batch.send(lambda pipe: pipe.zrange(index, 0, stale), "history_write_failed", drop)

    async def _drop_oldest(self, index: str) -> None:
        """Drop the runs past the newest ``max_jobs``, their keys with them: a key left behind
        by the index would take its memory for ``max_age`` (a week) though no listing shows
        it. By rank from the newest, so that trims running at once (several workers, or
        checks in one batch) never drop more than the excess."""
        ids = [_text(i) for i in await self._redis.zrange(index, 0, -(self.max_jobs + 1))]
        if ids:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(f"{self.prefix}:job:{i}" for i in ids))
                pipe.zrem(index, *ids)
                await pipe.execute()

    async def recent(
        self, *, pipeline: str | None = None, states: Sequence[str] = (), limit: int = 20
    ) -> list[JobRecord]:
        """Newest first, filtered; scans the index page by page until ``limit`` rows match."""
        out: list[JobRecord] = []
        start, page = 0, max(100, limit)
        while len(out) < limit:
            ids = await self._redis.zrevrange(f"{self.prefix}:jobs", start, start + page - 1)
            if not ids:
                break
            start += len(ids)
            keys = [f"{self.prefix}:job:{i.decode() if isinstance(i, bytes) else i}" for i in ids]
            blobs = await self._redis.mget(keys)
            for blob in blobs:
                if blob is None:
                    continue  # expired
                row = _job(blob)
                row.pop("result", None)
                if (pipeline is None or row["pipeline"] == pipeline) and (
                    not states or row["state"] in states
                ):
                    out.append(row)
                    if len(out) == limit:
                        break
        return out

    async def get(self, run_id: str) -> JobRecord | None:
        blob = await self._redis.get(f"{self.prefix}:job:{run_id}")
        return None if blob is None else _job(blob)

    async def count(self) -> int:
        return int(await self._redis.zcard(f"{self.prefix}:jobs"))


def _job(blob: bytes | str) -> JobRecord:
    """A run stored in Redis as ``job`` shows it: the summary ``jobs`` lists, and under
    ``"result"`` the result message (what is stored; a row stored whole by an earlier
    version is returned as it is)."""
    message = orjson.loads(blob)
    if "state" in message and "result" in message:
        return dict(message)
    trigger, error = message.get("trigger") or {}, message.get("error")
    return {
        "run_id": message["run_id"],
        "pipeline": message["pipeline"],
        "trigger": {"name": trigger.get("name"), "type": trigger.get("type")},
        "state": message["status"],
        "queued_at": message["queued_at"],
        "started_at": message["started_at"],
        "finished_at": message["finished_at"],
        "duration_ms": message["duration_ms"],
        "attempts": message["attempts"],
        "error": {"type": error["type"], "message": error["message"]} if error else None,
        "result": message,
    }


def history_prefix(queue: QueueSettings) -> str:
    """``<queue_name>:history``; ``{<queue_name>}:history`` on a Redis Cluster (a hash
    tag: every history key in one hash slot)."""
    if queue.redis.mode == "cluster":
        return f"{{{queue.queue_name}}}:history"
    return f"{queue.queue_name}:history"


def history_for(settings: Settings) -> JobHistory:
    """SQLite in the state dir, or Redis next to the queue when ``queue.broker`` is Redis."""
    h = settings.history
    if settings.queue.is_redis:
        return RedisHistory(
            settings.queue.redis,
            prefix=history_prefix(settings.queue),
            max_jobs=h.max_jobs,
            max_age=h.max_age,
            max_result_bytes=h.max_result_bytes,
        )
    return SqliteHistory(
        settings.state_path / "history.sqlite3",
        max_jobs=h.max_jobs,
        max_age=h.max_age,
        max_result_bytes=h.max_result_bytes,
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
