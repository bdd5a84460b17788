"""Redis mode under faults: a worker SIGKILLed mid-run, poison runs. Real processes, real signals.

Fault test 3 of issue 5 ("SIGKILL a worker mid-run; another worker finishes
the run") plus the poison-message promise in Redis mode: a run that fails
every attempt is acknowledged once and recorded as failed, and a run that
kills its worker every time is given up after ``queue.max_deliveries``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import anyio.to_thread
import orjson
import pytest
import redis.asyncio as aioredis

from flowerpower_daemon.state.history import RedisHistory
from tests.daemon_harness import (
    Config,
    DaemonProcess,
    collect_for,
    configure,
    daemon,
    make_project,
    online_daemon,
    unique,
)

pytestmark = pytest.mark.timeout(300)

CRASHER = (
    '"""Kills the process that runs it: a poison run for workers."""\n'
    "import os\nimport signal\n\n\n"
    "def crashed(x: int = 1) -> int:\n"
    '    """SIGKILL this process."""\n'
    "    os.kill(os.getpid(), signal.SIGKILL)\n    return x\n"
)


def _config(
    tmp_path: Path,
    port: int,
    redis_url: str,
    trigger: dict[str, Any],
    shutdown_timeout: float = 10,
    **queue: Any,
) -> Config:
    """One MQTT trigger ``t``, the queue on Redis (``queue`` options), the crasher pipeline."""
    project = make_project(tmp_path)
    (project / "pipelines" / "crasher.py").write_text(CRASHER)
    redis = {"broker": redis_url, "queue_name": unique("q"), **queue}
    trigger = {"name": "t", "type": "mqtt", **trigger}
    return configure(
        tmp_path, port, [trigger], project=project, queue=redis, shutdown_timeout=shutdown_timeout
    )


@asynccontextmanager
async def _redis(url: str) -> AsyncIterator[Any]:
    r = aioredis.Redis.from_url(url)
    try:
        yield r
    finally:
        await r.aclose()


async def _wait_started(r: Any, queue: str, count: int, worker: DaemonProcess) -> None:
    """Until ``count`` runs are under way (their starts are noted in ``<queue>:started:*``)."""
    try:
        with anyio.fail_after(60):
            while len([k async for k in r.scan_iter(f"{queue}:started:*")]) < count:
                assert worker.proc.poll() is None, worker.log()[-3000:]
                await anyio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"runs not started; worker log:\n{worker.log()[-3000:]}") from None


async def _unacked(r: Any, queue: str, group: str = "flowerpower-workers") -> int:
    return int((await r.xpending(queue, group))["pending"])


async def _results(
    c: aiomqtt.Client, topic_filter: str, want: int, settle: float, timeout: float
) -> list[dict[str, Any]]:
    """Results until ``want`` arrived (bounded by ``timeout``), then ``settle`` s more for extras."""
    out: list[dict[str, Any]] = []
    with anyio.move_on_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                out.append(orjson.loads(msg.payload))
                if len(out) >= want:
                    break
    out += [r for _, r in await collect_for(c, topic_filter, settle)]
    return out


async def test_sigkill_worker_mid_run_another_worker_finishes(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Three slow runs on worker A; SIGKILL A; workers B and C (started after) reclaim them:
    one success per message id, each saying attempts 2 (the lost one plus the rerun)."""
    topic = unique("slow")
    trigger = {"pipeline": "tagged", "topic": topic, "dedup_key": "{payload.msg_id}"}
    config = _config(tmp_path, mosquitto.port, redis_server.url, trigger, reclaim_after=2)
    queue, results = config.settings["queue"]["queue_name"], config.results
    async with _redis(redis_server.url) as r:
        async with online_daemon(config, subscribe=[results], workers=1) as d:
            [a] = d.workers
            for i in range(3):
                await d.client.publish(topic, orjson.dumps({"msg_id": i, "seconds": 4.0}), qos=1)
            await _wait_started(r, queue, 3, a)
            a.signal(signal.SIGKILL)
            a.wait(10)
            assert "run_finished" not in a.log()
            with daemon(config.path, "worker") as b, daemon(config.path, "worker") as w3:
                # Runs take 4 s > reclaim_after: B's and C's heartbeats keep them theirs,
                # so the settle time also catches a second, concurrent rerun.
                got = await _results(d.client, results, 3, settle=6.0, timeout=60)
                assert b.proc.poll() is None and w3.proc.poll() is None
                reclaimed = b.log().count("run_reclaimed_runs_again") + w3.log().count(
                    "run_reclaimed_runs_again"
                )
            assert await _unacked(r, queue) == 0
        async with RedisHistory(redis_server.url, prefix=f"{queue}:history") as history:
            stored = {res["run_id"]: await history.get(res["run_id"]) for res in got}
    by_id: dict[int, list[dict[str, Any]]] = {}
    for res in got:
        by_id.setdefault(res["outputs"]["msg"], []).append(res)
    assert sorted(by_id) == [0, 1, 2], got
    assert all(len(v) == 1 for v in by_id.values()), f"more than one result: {by_id}"
    assert all(res["status"] == "success" and res["attempts"] == 2 for res in got), got
    assert reclaimed == 3
    for run_id, job in stored.items():
        assert job is not None and job["state"] == "success" and job["attempts"] == 2, (run_id, job)


async def test_poison_run_failing_every_attempt_is_acked_and_recorded_failed(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A run that fails all 3 attempts: one failed result, acked in the stream, failed in the
    history, and not delivered again (waits 3x reclaim_after for a redelivery)."""
    topic = unique("poison")
    trigger = {
        "pipeline": "broken",
        "topic": topic,
        "run": {"max_retries": 2, "retry_delay": 0.1},
    }
    config = _config(tmp_path, mosquitto.port, redis_server.url, trigger, reclaim_after=1)
    queue = config.settings["queue"]["queue_name"]
    async with _redis(redis_server.url) as r:
        async with online_daemon(config, subscribe=[config.errors], workers=1) as d:
            [w] = d.workers
            await d.client.publish(topic, b'{"x": 7}', qos=1)
            got = await _results(d.client, config.errors, 1, settle=3.5, timeout=60)
            assert w.proc.poll() is None, w.log()
            assert await _unacked(r, queue) == 0
            assert [k async for k in r.scan_iter(f"{queue}:started:*")] == []
        async with RedisHistory(redis_server.url, prefix=f"{queue}:history") as history:
            jobs = await history.recent()
    assert len(got) == 1, got
    [res] = got
    assert res["status"] == "failed" and res["attempts"] == 3
    assert res["error"]["message"] == "boom 7"
    assert [(j["run_id"], j["state"], j["attempts"]) for j in jobs] == [
        (res["run_id"], "failed", 3)
    ]


async def test_run_that_kills_every_worker_is_given_up_after_max_deliveries(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A pipeline that SIGKILLs its worker: two workers die on it; the third records it as
    failed (WorkerLost, attempts 2) instead of running it, and nothing is redelivered."""
    topic = unique("crash")
    trigger = {"pipeline": "crasher", "topic": topic}
    config = _config(
        tmp_path, mosquitto.port, redis_server.url, trigger, reclaim_after=1, max_deliveries=2
    )
    queue = config.settings["queue"]["queue_name"]
    async with _redis(redis_server.url) as r:
        async with online_daemon(config, subscribe=[config.errors]) as d:
            await d.client.publish(topic, b'{"x": 1}', qos=1)
            for _ in range(2):
                with daemon(config.path, "worker") as doomed:
                    code = await anyio.to_thread.run_sync(doomed.wait, 60)  # bounded
                    assert code == -signal.SIGKILL, doomed.log()[-3000:]
            with daemon(config.path, "worker") as survivor:
                got = await _results(d.client, config.errors, 1, settle=3.5, timeout=60)
                assert survivor.proc.poll() is None, survivor.log()[-3000:]
                assert "run_given_up_workers_lost" in survivor.log()
            assert await _unacked(r, queue) == 0
    assert len(got) == 1, got
    [res] = got
    assert res["status"] == "failed" and res["attempts"] == 2
    assert res["error"]["type"] == "WorkerLost"


@dataclass
class _Stopped:
    """What came of a SIGTERM to a worker: results published, exit code, stream, log."""

    results: list[dict[str, Any]]
    code: int
    unacked: int
    started: list[Any]
    log: str
    elapsed: float  # from the first signal to the worker's exit


async def _sigterm_worker_during(
    tmp_path: Path,
    mosquitto: Any,
    redis_server: Any,
    seconds: list[float],
    *,
    timeout: float,
    again: float | None = None,
) -> _Stopped:
    """One run per entry of ``seconds`` (as long); SIGTERM to the worker once all are under way
    (and once more ``again`` s later)."""
    prefix = unique("stop")
    trigger = {"pipeline": "tagged", "topic": f"{prefix}/in"}
    config = _config(tmp_path, mosquitto.port, redis_server.url, trigger, shutdown_timeout=timeout)
    queue = config.settings["queue"]["queue_name"]
    async with (
        online_daemon(config, subscribe=[config.results], workers=1) as d,
        _redis(redis_server.url) as r,
    ):
        [worker] = d.workers
        for i, sec in enumerate(seconds):
            await d.client.publish(
                f"{prefix}/in", orjson.dumps({"msg_id": i, "seconds": sec}), qos=1
            )
        await _wait_started(r, queue, len(seconds), worker)
        first = time.monotonic()
        worker.signal(signal.SIGTERM)
        if again is not None:
            await anyio.sleep(again)
            worker.signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(worker.wait, timeout + 20)
        elapsed = time.monotonic() - first
        # Published before the worker exited: waiting in the client's queue by now.
        results = await _results(d.client, config.results, len(seconds), settle=0.5, timeout=3)
        started = [k async for k in r.scan_iter(f"{queue}:started:*")]
        unacked = await _unacked(r, queue)
    return _Stopped(results, code, unacked, started, worker.log(), elapsed)


async def test_sigterm_worker_finishes_its_runs_and_exits_0(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """SIGTERM to a worker with two 2 s runs under way: it takes no new run, both results are
    published (once), nothing stays unacked in the stream, and the worker exits 0."""
    out = await _sigterm_worker_during(tmp_path, mosquitto, redis_server, [2, 2], timeout=30)
    assert sorted(x["outputs"]["msg"] for x in out.results) == [0, 1], out.log[-3000:]
    assert all(x["status"] == "success" for x in out.results)
    assert out.code == 0, out.log[-3000:]
    assert out.unacked == 0 and out.started == []
    assert "worker_stopping" in out.log and "worker_runs_done" in out.log


async def test_sigterm_worker_cancels_at_shutdown_timeout_and_leaves_the_run_to_others(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A run longer than ``shutdown_timeout``: cancelled at the deadline, its start withdrawn,
    its message left unacked in the stream (another worker reclaims it); exit code 0."""
    out = await _sigterm_worker_during(tmp_path, mosquitto, redis_server, [8], timeout=1)
    assert out.code == 0, out.log[-3000:]
    assert "worker_runs_cancelled_at_deadline" in out.log, out.log[-3000:]
    assert out.results == []  # no result for a run that did not finish
    assert out.unacked == 1  # still in the stream for another worker
    assert out.started == []  # the interrupted attempt is not counted as a lost one


async def test_a_second_sigterm_a_second_later_cancels_at_once(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """SIGTERM, then SIGTERM again 1.5 s later: the 8 s run is cancelled then and there (not
    at the 30 s shutdown_timeout), its message left unacked for another worker."""
    out = await _sigterm_worker_during(
        tmp_path, mosquitto, redis_server, [8], timeout=30, again=1.5
    )
    assert "worker_cancelling_runs" in out.log, out.log[-3000:]
    assert out.elapsed < 7, out.elapsed  # before the run would have finished
    assert out.results == []
    assert out.unacked == 1 and out.started == []


async def test_a_repeated_sigterm_within_a_second_is_the_same_stop(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Two SIGTERMs 50 ms apart (a dying supervisor's parent-death signal can come once per
    thread it loses): one graceful stop, the 2 s run finishes and its result is published."""
    out = await _sigterm_worker_during(
        tmp_path, mosquitto, redis_server, [2], timeout=30, again=0.05
    )
    assert "worker_cancelling_runs" not in out.log, out.log[-3000:]
    assert [x["status"] for x in out.results] == ["success"], out.log[-3000:]
    assert out.code == 0 and out.unacked == 0


async def test_daemon_and_worker_carry_on_after_redis_restarts(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Redis restarts under a running daemon and worker: the first enqueue after it fails
    (a stale connection) and is tried again, the worker listens again, and a message sent
    afterwards gets its result; nothing stays unacked in the stream."""
    prefix = unique("rr")
    trigger = {"pipeline": "tagged", "topic": f"{prefix}/in"}
    config = _config(tmp_path, mosquitto.port, redis_server.url, trigger)
    queue = config.settings["queue"]["queue_name"]
    async with online_daemon(config, subscribe=[config.results], workers=1) as d:
        proc, [worker] = d.proc, d.workers
        body = {"msg_id": 1, "seconds": 0}
        await d.client.publish(f"{prefix}/in", orjson.dumps(body), qos=1)
        before = await _results(d.client, config.results, 1, settle=0, timeout=30)
        await redis_server.arestart()
        await d.client.publish(f"{prefix}/in", orjson.dumps({**body, "msg_id": 2}), qos=1)
        after = await _results(d.client, config.results, 1, settle=0.5, timeout=60)
        async with _redis(redis_server.url) as r:
            unacked = await _unacked(r, queue)
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert proc.proc.poll() is None, proc.log()[-3000:]
        wlog, dlog = worker.log(), proc.log()
    assert [r["outputs"]["msg"] for r in before] == [1]
    assert [r["outputs"]["msg"] for r in after] == [2], _events(wlog) + "\n--\n" + _events(dlog)
    assert unacked == 0, _events(wlog)


def _events(log: str) -> str:
    return "\n".join(line[:400] for line in log.splitlines() if '"event"' in line)
