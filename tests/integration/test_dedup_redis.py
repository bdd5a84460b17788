"""Dedup keys, run starts and stream reclaim in a real Redis (queue.broker on Redis)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from taskiq import AckableMessage
from taskiq.message import BrokerMessage

from flowerpower_daemon.queue.broker import RunLedger
from flowerpower_daemon.queue.streams import ReclaimingStreamBroker
from flowerpower_daemon.state.dedup import RedisDedupLookup, RedisDedupStore
from tests.daemon_harness import configure, make_project, online_daemon, unique
from tests.services import RedisService

pytestmark = pytest.mark.timeout(300)


async def test_claim_complete_and_forget(redis_session: RedisService) -> None:
    """One claim wins; the same run may claim again (a reclaim); complete makes it `done`."""
    async with RedisDedupStore(redis_session.url, unique("dd")) as store:
        with anyio.fail_after(30):
            assert await store.claim("k", "run-1", 60) == ("new", None)
            assert await store.claim("k", "run-2", 60) == ("running", None)
            assert await store.claim("k", "run-1", 60) == ("new", None)
            await store.complete("k", b'{"status": "success"}')
            assert await store.claim("k", "run-3", 60) == ("done", b'{"status": "success"}')
            assert await store.claim("k", "run-1", 60) == ("done", b'{"status": "success"}')
            await store.forget("k")  # a finished key stays
            assert (await store.claim("k", "run-4", 60))[0] == "done"
            assert await store.claim("other", "run-5", 60) == ("new", None)
            await store.forget("other")  # an unfinished one goes
            assert await store.claim("other", "run-6", 60) == ("new", None)


async def test_keys_expire_after_their_ttl(redis_session: RedisService) -> None:
    """A key is seen for `ttl` seconds; a result stored after the key expired gets a TTL."""
    prefix = unique("dd")
    async with RedisDedupStore(redis_session.url, prefix, default_ttl=5) as store:
        with anyio.fail_after(30):
            assert (await store.claim("k", "run-1", 0.3))[0] == "new"
            await anyio.sleep(0.5)
            assert (await store.claim("k", "run-2", 0.3))[0] == "new"  # expired: runs again
            await anyio.sleep(0.5)
            await store.complete("k", b"{}")  # the run outlived its key
            ttl = await store._redis.pttl(f"{prefix}:k")
            assert 0 < ttl <= 5000


async def test_daemon_side_lookup_claims_nothing(redis_session: RedisService) -> None:
    """The daemon's view answers `done` for finished keys, `new` for the rest, writes nothing."""
    prefix = unique("dd")
    async with (
        RedisDedupStore(redis_session.url, prefix) as worker,
        RedisDedupLookup(redis_session.url, prefix) as daemon_side,
    ):
        with anyio.fail_after(30):
            assert await daemon_side.claim("k", "run-1", 60) == ("new", None)
            assert await worker.claim("k", "run-2", 60) == ("new", None)  # nothing was claimed
            assert await daemon_side.claim("k", "run-3", 60) == ("new", None)  # running: enqueue
            await daemon_side.forget("k")
            assert await worker.claim("k", "run-4", 60) == ("running", None)  # still held
            await worker.complete("k", b"result")
            assert await daemon_side.claim("k", "run-5", 60) == ("done", b"result")
    # Redis unreachable: enqueue anyway, the worker decides.
    async with RedisDedupLookup("redis://127.0.0.1:1/0", prefix) as unreachable:
        with anyio.fail_after(30):
            assert await unreachable.claim("k", "run-6", 60) == ("new", None)


async def test_run_ledger_reports_earlier_starts(redis_session: RedisService) -> None:
    """Each start of an unfinished run is kept; a cancelled start is withdrawn; finish clears."""
    prefix = unique("started")
    async with (
        RunLedger(redis_session.url, prefix, who="w1") as first,
        RunLedger(redis_session.url, prefix, who="w2") as second,
    ):
        with anyio.fail_after(30):
            assert (await first.started("r"))[0] == []
            lost, entry = await second.started("r")
            assert [who for _, who in lost] == ["w1"]
            await second.withdraw("r", entry)
            lost, _ = await second.started("r")
            assert [who for _, who in lost] == ["w1"]
            await second.finished("r")
            assert (await first.started("r"))[0] == []


def _broker(url: str, queue: str, idle_ms: int) -> ReclaimingStreamBroker:
    return ReclaimingStreamBroker(
        url, queue_name=queue, consumer_group_name="g", idle_timeout=idle_ms, xread_block=100
    )


async def _next(broker: ReclaimingStreamBroker, timeout: float) -> AckableMessage | None:
    """The next message ``broker.listen`` yields within ``timeout`` s (a fresh generator)."""
    gen = broker.listen()
    try:
        with anyio.move_on_after(timeout):
            return await gen.__anext__()
        return None
    finally:
        await gen.aclose()


async def test_idle_stream_reclaims_a_dead_consumers_message(redis_session: RedisService) -> None:
    """A live consumer's heartbeat keeps its message; once it stops, another takes it over
    without any new message arriving (taskiq-redis alone waits for one)."""
    queue = unique("stream")
    a = _broker(redis_session.url, queue, idle_ms=400)
    b = _broker(redis_session.url, queue, idle_ms=400)
    await a.startup()
    await b.startup()
    try:
        with anyio.fail_after(60):
            await a.kick(BrokerMessage(task_id="t1", task_name="x", message=b"payload", labels={}))
            held = await _next(a, 10)
            assert held is not None and held.data == b"payload"
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.keep_claimed)
                assert await _next(b, 1.5) is None  # a is alive: b must not take it
                tg.cancel_scope.cancel()
            taken = await _next(b, 5)  # a stopped its heartbeat: b reclaims on an idle stream
            assert taken is not None and taken.data == b"payload"
            await taken.ack()  # type: ignore[misc]
            assert await _next(a, 1.0) is None  # acked: nobody gets it again
    finally:
        await a.shutdown()
        await b.shutdown()


def _events(log: str, event: str) -> Counter[str]:
    """Run ids of the ``event`` lines in a (JSON) worker log."""
    out: Counter[str] = Counter()
    for line in log.splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("event") == event:
                out[entry["run_id"]] += 1
    return out


async def test_two_daemons_on_one_redis_run_a_duplicated_message_once(
    tmp_path: Path, mosquitto: Any, redis_server: RedisService
) -> None:
    """Two daemons get the same message (both subscribe to the topic) and enqueue it; the
    worker runs it once; a later duplicate gets the earlier result from the daemons."""
    topic = unique("dup")
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    trigger = {
        "name": "tagged",
        "type": "mqtt",
        "pipeline": "tagged",
        "topic": topic,
        "dedup_key": "{payload.msg_id}",
    }
    project = make_project(tmp_path)
    one = configure(tmp_path / "one", mosquitto.port, [trigger], project=project, queue=queue)
    # One result topic for both (the worker publishes to the daemon's reply target).
    result_topic = one.settings["mqtt"]["result_topic"]
    two = configure(
        tmp_path / "two",
        mosquitto.port,
        [trigger],
        project=project,
        queue=queue,
        mqtt={"result_topic": result_topic},
    )
    results = one.results
    async with online_daemon(one, two, subscribe=[results], workers=1) as d:
        c, [worker] = d.client, d.workers
        await c.publish(topic, orjson.dumps({"msg_id": 1, "seconds": 0.5}), qos=1)
        await c.publish(topic, orjson.dumps({"msg_id": 2, "seconds": 0.5}), qos=1)
        got = await d.collect_for(results, 8.0)
        # Later: both daemons answer from the stored result, nothing is enqueued.
        await c.publish(topic, orjson.dumps({"msg_id": 1, "seconds": 0.5}), qos=1)
        again = await d.collect_for(results, 4.0)
        assert worker.proc.poll() is None, worker.log()
        log = worker.log()
    runs: dict[int, set[str]] = {}
    for _, r in got + again:
        assert r["status"] == "success", r
        runs.setdefault(r["outputs"]["msg"], set()).add(r["run_id"])
    assert {k: len(v) for k, v in runs.items()} == {1: 1, 2: 1}, runs
    finished = _events(log, "run_finished")
    assert sum(finished.values()) == 2, log[-3000:]
    assert set(finished) == runs[1] | runs[2]
    # Each message reached the worker twice (once per daemon); the second copy was not run.
    assert sum(_events(log, "duplicate_not_run").values()) == 2, log[-3000:]
    assert len([r for _, r in again if r["outputs"]["msg"] == 1]) == 2  # one per daemon
