"""A worker's group-committed Redis writes (state/batch.py) against a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from flowerpower_daemon.project.models import AttemptInfo, RunResult, TriggerInfo
from flowerpower_daemon.queue.broker import RunLedger
from flowerpower_daemon.state import batch as batch_module
from flowerpower_daemon.state.batch import WriteBatch
from flowerpower_daemon.state.history import RedisHistory
from tests.daemon_harness import unique
from tests.services import RedisService

pytestmark = pytest.mark.timeout(60)


def _result(run_id: str, age: float) -> RunResult:
    end = datetime.now(UTC) - timedelta(seconds=age)
    return RunResult(
        run_id=run_id,
        pipeline="p",
        status="success",
        outputs={"x": 1},
        error=None,
        attempts=(AttemptInfo(1, end, end, "success", None),),
        queued_at=end,
        started_at=end,
        finished_at=end,
        trigger=TriggerInfo("t", "interval"),
    )


async def _stream_with(r: Any, stream: str, n: int) -> list[bytes]:
    """A stream with a group ``g`` and ``n`` entries read (pending) by consumer ``c``."""
    await r.xgroup_create(stream, "g", id="0", mkstream=True)
    for i in range(n):
        await r.xadd(stream, {"data": str(i)})
    [(_, entries)] = await r.xreadgroup("g", "c", {stream: ">"})
    return [entry_id for entry_id, _ in entries]


async def test_writes_queued_together_go_in_one_round_trip_in_order(
    redis_session: RedisService,
) -> None:
    """Submitted, sent and ack writes queued together: one pipeline, in order, acks merged."""
    key, stream = unique("wb"), unique("wbs")
    r = aioredis.Redis.from_url(redis_session.url)
    done: list[list[Any]] = []
    try:
        ids = await _stream_with(r, stream, 3)
        async with WriteBatch(redis_session.url) as batch:
            batch.send(lambda p: p.set(key, b"1"), "test_failed", done.append)
            later = batch.submit(lambda p: (p.incr(key), p.get(key)))
            for entry_id in ids:
                batch.ack(stream, "g", entry_id)
            assert batch.pending == 5
            with anyio.fail_after(10):
                await batch.flush()
                assert await later == [2, b"2"]  # saw the earlier write
            assert done == [[True]]
            assert (batch.round_trips, batch.writes, batch.pending) == (1, 5, 0)
        assert (await r.xpending(stream, "g"))["pending"] == 0  # one XACK took all three
    finally:
        await r.delete(key, stream)
        await r.aclose()


async def test_a_failing_write_fails_alone(redis_session: RedisService) -> None:
    """A command error goes to its own write (a reply object or a log); the others land."""
    key, other = unique("wb"), unique("wb")
    r = aioredis.Redis.from_url(redis_session.url)
    called: list[object] = []
    try:
        await r.rpush(key, b"x")  # a list: INCR on it fails (WRONGTYPE)
        async with WriteBatch(redis_session.url) as batch:
            bad = batch.submit(lambda p: p.incr(key))
            batch.send(lambda p: p.incr(key), "test_write_failed", called.append)
            good = batch.submit(lambda p: p.set(other, b"y"))
            with anyio.fail_after(10):
                await batch.flush()
                [error] = await bad
                assert isinstance(error, Exception) and "WRONGTYPE" in str(error)
                assert await good == [True]
        assert called == []  # no follow-up for the failed write
        assert await r.get(other) == b"y"
    finally:
        await r.delete(key, other)
        await r.aclose()


async def test_several_xadds_reach_a_blocked_reader_in_one_read(
    redis_session: RedisService,
) -> None:
    """A batch of XADDs goes in MULTI/EXEC: a reader blocked on the stream gets them in one
    read (Redis hands entries to blocked readers after each command, after EXEC in a
    transaction); the other writes of the batch get their replies as before."""
    stream, key = unique("wbx"), unique("wb")
    r = aioredis.Redis.from_url(redis_session.url)
    reader = aioredis.Redis.from_url(redis_session.url)
    try:
        await r.xgroup_create(stream, "g", id="$", mkstream=True)
        reads: list[int] = []

        async def read() -> None:
            [(_, entries)] = await reader.xreadgroup("g", "c", {stream: ">"}, block=10_000)
            reads.append(len(entries))

        async with WriteBatch(redis_session.url) as batch, anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.fail_after(10):
                while not (await r.info("clients"))["blocked_clients"]:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # until the reader waits in its XREADGROUP
                added = [
                    batch.submit(lambda p, i=i: p.xadd(stream, {"data": str(i)})) for i in range(5)
                ]
                counted = batch.submit(lambda p: p.incr(key))
                await batch.flush()
                ids = [(await a)[0] for a in added]
                assert await counted == [1]
        assert reads == [5]
        assert [entry_id for entry_id, _ in await r.xrange(stream)] == ids
        assert batch.round_trips == 1
    finally:
        await r.delete(stream, key)
        await r.aclose()
        await reader.aclose()


async def test_a_failing_write_in_a_transaction_fails_alone(redis_session: RedisService) -> None:
    """In a batch of XADDs (a transaction), an XADD that fails as it runs fails alone, and a
    command Redis refuses to queue fails every write of the transaction (none was run)."""
    stream, wrong = unique("wbx"), unique("wb")
    r = aioredis.Redis.from_url(redis_session.url)
    try:
        await r.set(wrong, b"x")  # a string: XADD to it fails (WRONGTYPE)
        async with WriteBatch(redis_session.url) as batch:
            with anyio.fail_after(10):
                good = batch.submit(lambda p: p.xadd(stream, {"data": "1"}))
                bad = batch.submit(lambda p: p.xadd(wrong, {"data": "2"}))
                await batch.flush()
                [entry_id] = await good
                [error] = await bad
                assert isinstance(error, Exception) and "WRONGTYPE" in str(error)
                assert [i for i, _ in await r.xrange(stream)] == [entry_id]

                first = batch.submit(lambda p: p.xadd(stream, {"data": "3"}))
                refused = batch.submit(lambda p: p.execute_command("XADD", stream))  # arity
                await batch.flush()
                [aborted] = await first
                [wrong_arity] = await refused
        assert "not run: its transaction was refused" in str(aborted), aborted
        assert "wrong number of arguments" in str(aborted), aborted
        assert "wrong number of arguments" in str(wrong_arity), wrong_arity
        assert await r.xlen(stream) == 1  # the aborted transaction added nothing
    finally:
        await r.delete(stream, wrong)
        await r.aclose()


async def test_unreachable_redis_fails_waiters_and_gives_acks_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No server: a waiting write gets the error; an ack is tried ACK_TRIES times, then
    dropped (the run stays in the stream for another worker)."""
    monkeypatch.setattr(batch_module, "ACK_TRIES", 2)
    async with WriteBatch("redis://127.0.0.1:1/0") as batch:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(batch.run)
                waiting = batch.submit(lambda p: p.set("k", b"v"))
                batch.ack("s", "g", b"1-1")
                with pytest.raises(Exception, match=r"(?i)connect"):
                    await waiting
                while batch.pending:  # noqa: ASYNC110 - the batch's retries
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
    assert batch.round_trips == 2  # the first send and one retry of the ack


async def test_leaving_sends_what_is_queued(redis_session: RedisService) -> None:
    """Writes queued when the worker stops go out before the client closes."""
    key = unique("wb")
    r = aioredis.Redis.from_url(redis_session.url)
    try:
        async with WriteBatch(redis_session.url) as batch:
            batch.send(lambda p: p.set(key, b"late"), "test_failed")
        assert await r.get(key) == b"late"
    finally:
        await r.delete(key)
        await r.aclose()


async def test_batched_history_is_trimmed_to_max_jobs(redis_session: RedisService) -> None:
    """History records through a batch: listed like direct ones, trimmed past max_jobs,
    the trimmed runs' keys removed with them."""
    prefix = unique("hist")
    async with (
        WriteBatch(redis_session.url) as batch,
        RedisHistory(redis_session.url, prefix=prefix, max_jobs=4) as history,
    ):
        history.batch = batch
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(batch.run)
                for i in range(6):
                    await history.record(_result(f"r{i}", age=10 - i))
                # Checked as writes land; the trimmed keys go in a follow-up write.
                while (  # noqa: ASYNC110 - Redis's state
                    history.recorded < 6
                    or await history.count() > 4
                    or await history._redis.exists(f"{prefix}:job:r1")
                ):
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
            assert [j["run_id"] for j in await history.recent()] == ["r5", "r4", "r3", "r2"]
            assert not await history._redis.exists(f"{prefix}:job:r0")
            stored = await history.get("r5")
            assert stored is not None and stored["result"]["outputs"] == {"x": 1}


async def test_batched_first_start_is_seen_by_a_reclaiming_worker(
    redis_session: RedisService,
) -> None:
    """A first delivery's start note (batched, no read) is what a worker that reclaims the
    run reads as a lost attempt; the batched finish clears it."""
    prefix = unique("started")
    async with (
        WriteBatch(redis_session.url) as batch,
        RunLedger(redis_session.url, prefix, who="w1") as first,
        RunLedger(redis_session.url, prefix, who="w2") as second,
    ):
        first.batch = batch
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(batch.run)
                assert (await first.started("r", first=True))[0] == []
                lost, _ = await second.started("r")  # reclaimed: reads the ledger
                assert [who for _, who in lost] == ["w1"]
                await first.finished("r")
                await batch.submit(lambda p: p.ping())  # after the finish, in order
                tg.cancel_scope.cancel()
            assert (await second.started("r"))[0] == []


async def test_ledger_reads_a_list_note_left_by_an_earlier_version(
    redis_session: RedisService,
) -> None:
    """Starts noted as a list (before notes became one string) still count as lost; the
    withdrawn entry goes and the last one takes the key with it."""
    prefix = unique("started")
    r = aioredis.Redis.from_url(redis_session.url)
    try:
        await r.rpush(f"{prefix}:r", b"1700000000.5 old:1")
        async with RunLedger(redis_session.url, prefix, who="w2") as ledger:
            with anyio.fail_after(30):
                lost, entry = await ledger.started("r")
                assert [(t.timestamp(), who) for t, who in lost] == [(1700000000.5, "old:1")]
                await ledger.withdraw("r", entry)
                lost, entry = await ledger.started("r")
                assert [who for _, who in lost] == ["old:1"]
                await ledger.withdraw("r", entry)
                await ledger.withdraw("r", "1700000000.5 old:1")
                assert not await r.exists(f"{prefix}:r")
    finally:
        await r.delete(f"{prefix}:r")
        await r.aclose()


async def test_history_keeps_the_result_message_and_reads_older_rows(
    redis_session: RedisService,
) -> None:
    """A run is stored as its result message (the summary is made on reading); a row stored
    whole (summary + result) by an earlier version reads the same."""
    prefix = unique("hist")
    async with RedisHistory(redis_session.url, prefix=prefix) as history:
        with anyio.fail_after(30):
            await history.record(_result("new", age=1))
            stored = await history._redis.get(f"{prefix}:job:new")
            assert stored is not None and b'"status":"success"' in stored
            new = await history.get("new")
            assert new is not None
            old = orjson.loads(orjson.dumps(new))  # a copy, as an earlier version stored it
            old["run_id"] = old["result"]["run_id"] = "old"
            await history._redis.set(f"{prefix}:job:old", orjson.dumps(old))
            await history._redis.zadd(f"{prefix}:jobs", {"old": 0.0})
            assert await history.get("old") == old
            listed = {j["run_id"]: j for j in await history.recent()}
            assert listed["new"] == {k: v for k, v in new.items() if k != "result"}
            assert listed["new"]["state"] == "success" and listed["new"]["attempts"] == 1
            assert listed["new"]["trigger"] == {"name": "t", "type": "interval"}
            assert listed["old"]["run_id"] == "old" and "result" not in listed["old"]


async def test_sent_wakes_once_the_write_left_and_never_raises(
    redis_session: RedisService,
) -> None:
    """``sent`` (a run's start note): the future is done once the batch is written, the
    write lands; a failing one is logged as its event and still wakes its waiter."""
    key, bad_key = unique("wb"), unique("wb")
    r = aioredis.Redis.from_url(redis_session.url)
    try:
        await r.rpush(bad_key, b"x")
        with capture_logs() as logs:
            async with WriteBatch(redis_session.url) as batch:
                note = batch.sent(lambda p: p.set(key, b"noted", ex=60), "test_note_failed")
                failing = batch.sent(lambda p: p.incr(bad_key), "test_note_failed")
                with anyio.fail_after(10):
                    await batch.flush()
                    assert await note is None and await failing is None
        assert await r.get(key) == b"noted"
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["test_note_failed"]
    finally:
        await r.delete(key, bad_key)
        await r.aclose()


async def test_sent_without_redis_wakes_its_waiter_and_logs() -> None:
    """No server: a ``sent`` waiter is woken (the run goes on without its note), logged."""
    with capture_logs() as logs:
        async with WriteBatch("redis://127.0.0.1:1/0") as batch:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    await tg.start(batch.run)
                    assert await batch.sent(lambda p: p.set("k", b"v"), "test_note_failed") is None
                    tg.cancel_scope.cancel()
    assert "test_note_failed" in [e["event"] for e in logs]
