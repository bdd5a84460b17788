"""Issue 13: one daemon and three Redis workers carry 1,000 QoS 1 messages, each run exactly once.

A real Mosquitto and a real Redis (started by the fixtures), ``flowerpower-daemon
run`` with ``queue.broker`` on Redis and three ``flowerpower-daemon worker``
processes. Each message has its own id in its topic (``<prefix>/m<i>``), which
the ``temperature`` pipeline returns as ``outputs.device_id``: the results say
which message each run was for, and the job history (in Redis, shared) which
runs there were, so a message run twice or never shows.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from control_harness import CTL, NO_SYSTEMD, request
from daemon_harness import DaemonProcess, configure, online_daemon, unique

# Start-up of four processes on a loaded machine dominates; the run itself takes seconds.
pytestmark = pytest.mark.timeout(240)

HOST = socket.gethostname()
MESSAGES = 1000
WORKERS = 3


async def _consuming(workers: list[DaemonProcess], timeout: float) -> None:
    """Wait (bounded) until every worker reads the stream: all of them can take runs."""
    with anyio.fail_after(timeout):
        while not all("worker_consuming" in w.log() for w in workers):
            for w in workers:
                assert w.proc.poll() is None, f"worker exited: {w.log()[-3000:]}"
            await anyio.sleep(0.1)


def _done_by_workers(sock: Path, expected: int, timeout: float) -> list[dict[str, Any]]:
    """The live workers from ``status`` once their ``done`` counts add up to ``expected``."""
    deadline = time.monotonic() + timeout
    workers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        workers = request(sock, "status")["result"]["workers"]
        if sum(w["done"] for w in workers) >= expected and len(workers) == WORKERS:
            return workers
        time.sleep(0.2)
    return workers


async def test_one_daemon_three_workers_run_1000_messages_exactly_once(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """1,000 QoS 1 messages -> 1,000 success results, one per message id, no duplicates, none
    missing (results and the shared history agree), every worker named in some result, and
    the workers' own run counts add up to 1,000."""
    prefix = unique("fleet")
    triggers = [
        {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": f"{prefix}/{{device}}"}
    ]
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    config = configure(tmp_path, mosquitto.port, triggers, queue=queue)
    expected = {f"m{i}" for i in range(MESSAGES)}
    async with online_daemon(
        config, subscribe=[config.results], workers=WORKERS, env=NO_SYSTEMD
    ) as d:
        await _consuming(d.workers, 120)
        with anyio.fail_after(60):
            for i in range(MESSAGES):
                await d.client.publish(f"{prefix}/m{i}", b'{"temperature": 21.5}', qos=1)
        results = [r for _, r, _ in await d.collect(f"{d.tag}/results/temperature", MESSAGES, 90)]
        # a run done twice would publish a second result: give a duplicate time to show
        late = await d.collect_for(f"{d.tag}/results/#", 1.0)
        workers = _done_by_workers(config.sock, MESSAGES, 15)
        history = request(config.sock, "jobs", {"limit": 1000, "pipeline": "temperature"})
        names = {f"{HOST}:{w.proc.pid}" for w in d.workers}
        logs = [w.log() for w in d.workers]
        fleet = subprocess.run(
            [str(CTL), "--socket", str(config.sock), "status", "--fleet"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    ids = Counter(r["outputs"]["device_id"] for r in results)
    assert late == [], f"{len(late)} results after the 1,000th, e.g. {late[:2]}"
    assert [i for i, n in ids.items() if n > 1] == []
    assert set(ids) == expected, f"missing {sorted(expected - set(ids))[:10]}"
    assert Counter(r["status"] for r in results) == {"success": MESSAGES}
    assert len({r["run_id"] for r in results}) == MESSAGES
    ran_by = Counter(r["worker"] for r in results)
    assert set(ran_by) == names, ran_by
    assert history["ok"], history
    rows = history["result"]
    assert len(rows) == MESSAGES
    assert Counter(row["state"] for row in rows) == {"success": MESSAGES}
    assert {row["run_id"] for row in rows} == {r["run_id"] for r in results}
    assert {w["name"] for w in workers} == names, workers
    assert sum(w["done"] for w in workers) == MESSAGES, workers
    assert all("Traceback" not in log for log in logs)
    # The fleet view: this daemon's retained status and the three live workers.
    assert fleet.returncode == 0, fleet.stderr
    lines = fleet.stdout.splitlines()
    assert any(f"{d.tag} (this)" in line and "online" in line for line in lines), lines
    assert all(any(name in line for line in lines) for name in names), lines


async def test_slow_runs_are_spread_over_the_idle_workers(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A burst of runs that take 0.6 s each, two workers that run one at a time: a worker
    reads no more entries than it can start soon, so both take a share (one that took the
    whole burst would run it alone while the other idles)."""
    prefix = unique("spread")
    runs = 8
    triggers = [
        {"name": "slow", "type": "mqtt", "pipeline": "tagged", "topic": f"{prefix}/in", "qos": 1}
    ]
    queue = {"broker": redis_server.url, "queue_name": unique("q"), "worker_concurrency": 1}
    config = configure(tmp_path, mosquitto.port, triggers, queue=queue)
    async with online_daemon(config, subscribe=[config.results], workers=2, env=NO_SYSTEMD) as d:
        await _consuming(d.workers, 120)
        for i in range(runs):
            await d.client.publish(f"{prefix}/in", b'{"msg_id": %d, "seconds": 0.6}' % i, qos=1)
        results = [r for _, r, _ in await d.collect(f"{d.tag}/results/tagged", runs, 60)]
    assert sorted(r["outputs"]["msg"] for r in results) == list(range(runs))
    ran_by = Counter(r["worker"] for r in results)
    assert len(ran_by) == 2 and min(ran_by.values()) >= 3, ran_by
