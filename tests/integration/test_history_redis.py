"""The Redis job history: shared by the daemon and its workers when the queue is on Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from control_harness import ctl, ok, ready_daemon
from daemon_harness import configure, unique
from services import MosquittoService, RedisService

from flowerpower_daemon.project.models import AttemptInfo, ErrorInfo, RunResult, TriggerInfo
from flowerpower_daemon.state.history import RedisHistory

pytestmark = pytest.mark.timeout(300)


def _result(run_id: str, status: str = "success", age: float = 0.0) -> RunResult:
    end = datetime.now(UTC) - timedelta(seconds=age)
    error = None if status == "success" else ErrorInfo("RuntimeError", "boom")
    return RunResult(
        run_id=run_id,
        pipeline="p" if status == "success" else "q",
        status=status,  # type: ignore[arg-type]
        outputs={"x": [1, 2]},
        error=error,
        attempts=(AttemptInfo(1, end, end, status, error),),  # type: ignore[arg-type]
        queued_at=end,
        started_at=end,
        finished_at=end,
        trigger=TriggerInfo("t", "interval"),
    )


async def test_redis_history_records_filters_and_trims(redis_session: RedisService) -> None:
    """Runs are stored with their result, listed newest first, filtered and trimmed by count."""
    prefix = unique("hist")
    async with RedisHistory(redis_session.url, prefix=prefix, max_jobs=4) as history:
        with anyio.fail_after(30):
            for i in range(6):
                await history.record(
                    _result(f"r{i}", "failed" if i == 4 else "success", age=10 - i)
                )
            assert await history.count() == 4
            assert [r["run_id"] for r in await history.recent()] == ["r5", "r4", "r3", "r2"]
            failed = await history.recent(states=("failed",))
            assert [r["run_id"] for r in failed] == ["r4"] and failed[0]["pipeline"] == "q"
            assert [r["run_id"] for r in await history.recent(pipeline="p", limit=2)] == [
                "r5",
                "r3",
            ]
            full = await history.get("r5")
            assert full is not None and full["result"]["outputs"] == {"x": [1, 2]}
            assert "result" not in (await history.recent(limit=1))[0]
            # Trimmed runs go whole: no key left to take memory until max_age.
            assert await history.get("r0") is None and await history.get("r1") is None
            assert not await history._redis.exists(f"{prefix}:job:r0")
            assert await history.get("nope") is None


def test_ctl_sees_runs_that_a_redis_worker_executed(
    mosquitto_session: MosquittoService, redis_session: RedisService, tmp_path: Path
) -> None:
    """With the queue on Redis, `run` goes to a worker and `job`/`jobs` show its result."""
    queue = {"broker": redis_session.url, "queue_name": unique("q")}
    config = configure(tmp_path, mosquitto_session.port, queue=queue)
    sock = config.sock
    with ready_daemon(config, workers=1) as run:
        [w] = run.workers
        assert ok(sock, "status")["queue"]["backend"] == "redis"
        job = ok(sock, "run", "stats", "--inputs", '{"readings": [2, 4]}')
        deadline = time.monotonic() + 120
        while True:
            try:
                found = ok(sock, "job", job["run_id"])
            except AssertionError:
                found = None  # not in the shared history yet
            if found is not None and found["state"] == "success":
                break
            assert time.monotonic() < deadline, w.log()[-3000:]
            time.sleep(0.2)
        assert found["result"]["outputs"]["mean"] == 3.0
        assert job["run_id"] in [r["run_id"] for r in ok(sock, "jobs", "--pipeline", "stats")]
        refused = ctl(sock, "run", "stats", "--wait")
        assert refused.rc == 1 and "conflict" in refused.err
