"""Issue 13: every result names where it ran; the daemon lists the live workers of its Redis queue.

A result (and its history entry) carries ``"worker": "<hostname>:<pid>"``:
the worker process's in Redis mode, the daemon's own for in-process runs.
``status`` answers ``workers``: the live workers (name, runs in flight, runs
done, last seen), read from Redis. A worker's log has no "Can't parse
argument" warning (taskiq used to try a pydantic model of the task's argument).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from control_harness import CTL, NO_SYSTEMD, request, wait_ready
from daemon_harness import DaemonProcess, configure, online_daemon, unique

pytestmark = pytest.mark.timeout(180)

HOST = socket.gethostname()


def _temp_trigger() -> tuple[list[dict[str, Any]], str]:
    prefix = unique("w")
    topic = f"{prefix}/{{device}}"
    return [{"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": topic}], prefix


def _job(sock: Path, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        answer = request(sock, "job", {"id": run_id})
        if answer.get("ok") and "result" in answer["result"]:
            return answer["result"]  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)


def _workers_until(
    sock: Path, proc: DaemonProcess, check: Any, timeout: float = 20
) -> list[dict[str, Any]]:
    """Poll ``status`` until ``check(workers)`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    workers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        answer = request(sock, "status")
        workers = answer["result"]["workers"]
        if check(workers):
            return workers
        time.sleep(0.2)
    raise AssertionError(f"status workers never matched: {workers}; log:\n{proc.log()[-2000:]}")


async def test_in_process_result_names_the_daemon(tmp_path: Path, mosquitto: Any) -> None:
    """Memory queue: the result and its history entry name the daemon; no workers listed."""
    triggers, prefix = _temp_trigger()
    config = configure(tmp_path, mosquitto.port, triggers)
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as d:
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
        _, result, _ = await d.next_message(f"{d.tag}/results/temperature", 60)
        status = wait_ready(config.sock, d.proc)
        job = _job(config.sock, result["run_id"])
        pid = d.proc.proc.pid
    assert result["status"] == "success"
    assert result["worker"] == f"{HOST}:{pid}"
    assert job["result"]["worker"] == result["worker"]
    assert status["workers"] == []


async def test_redis_worker_named_in_result_history_and_status(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """Redis queue: the result names the worker, status (and `flowerpowerctl status`) lists it
    live with its counts, it leaves the listing when it stops; its log has no "Can't parse
    argument" warning."""
    triggers, prefix = _temp_trigger()
    queue = {"broker": redis_server.url, "queue_name": unique("q")}
    config = configure(tmp_path, mosquitto.port, triggers, queue=queue)
    sock = config.sock
    async with online_daemon(
        config, subscribe=[config.results], workers=1, env=NO_SYSTEMD
    ) as d:
        proc, [worker] = d.proc, d.workers
        name = f"{HOST}:{worker.proc.pid}"
        for i in range(2):
            await d.client.publish(f"{prefix}/dev{i}", b'{"temperature": 12}', qos=1)
        results = await d.collect(f"{d.tag}/results/temperature", 2, 60)
        wait_ready(sock, proc)
        job = _job(sock, results[0][1]["run_id"])
        [listed] = _workers_until(sock, proc, lambda ws: len(ws) == 1 and ws[0]["done"] >= 2)
        shown = subprocess.run(
            [str(CTL), "--socket", str(sock), "status"], capture_output=True, text=True, timeout=30
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        _workers_until(sock, proc, lambda ws: ws == [])
        log = worker.log()
    assert [r["worker"] for _, r, _ in results] == [name, name]
    assert all(r["status"] == "success" for _, r, _ in results)
    assert job["result"]["worker"] == name
    assert listed["name"] == name
    assert listed["in_flight"] == 0 and listed["concurrency"] == 4
    assert listed["age_s"] < 10 and listed["last_seen"] and listed["started_at"]
    assert shown.returncode == 0, shown.stderr
    assert "WORKER" in shown.stdout and name in shown.stdout, shown.stdout
    assert "run_finished" in log
    assert "Can't parse argument" not in log
