"""``worker --processes 3`` outside systemd on a real Redis and Mosquitto: when the
supervising parent is SIGKILLed, its children (which run in sessions of their own, out of
reach of a terminal's signals) stop too, within a bounded time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from control_harness import NO_SYSTEMD
from daemon_harness import BIN, base_settings, make_project, unique, write_config

pytestmark = pytest.mark.timeout(180)


def _children(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_children_stop_when_the_parent_is_sigkilled(
    tmp_path: Path, mosquitto_session: Any, redis_server: Any
) -> None:
    s = base_settings(make_project(tmp_path), tmp_path, mosquitto_session.port)
    queue = unique("q")
    s["queue"] = {"broker": redis_server.url, "queue_name": queue}
    s["shutdown_timeout"] = 5
    config = write_config(tmp_path, s)
    r = redis.Redis.from_url(redis_server.url)
    log = (tmp_path / "workers.log").open("wb")
    env = {**os.environ, **NO_SYSTEMD, "HAMILTON_TELEMETRY_ENABLED": "false"}
    parent = subprocess.Popen(
        [str(BIN / "flowerpower-daemon"), "worker", "-c", str(config), "--processes", "3"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while r.zcard(f"{{{queue}}}:workers") < 3:  # all three consume from the stream
            assert parent.poll() is None, (tmp_path / "workers.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "3 workers did not start"
            time.sleep(0.2)
        children = _children(parent.pid)
        assert len(children) == 3, children
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in children):
            assert time.monotonic() < deadline, f"orphaned workers: {children}"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for child in children:
            if _alive(child):
                os.kill(child, signal.SIGKILL)
        log.close()
    # They stopped as on SIGTERM: each left the live workers' listing on its way out.
    assert r.zcard(f"{{{queue}}}:workers") == 0
