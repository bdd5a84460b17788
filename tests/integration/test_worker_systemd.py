"""Issue 13: workers are services too. The worker unit's contents (systemd-analyze
checks both units in test_systemd.py), sd_notify as a real worker speaks it, and ``worker --processes N``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from control_harness import NO_SYSTEMD
from daemon_harness import BIN, base_settings, daemon, make_project, unique, write_config
from systemd_harness import WORKER_UNIT, NotifyListener

pytestmark = pytest.mark.timeout(180)

HOST = socket.gethostname()
GROUP = "flowerpower-workers"  # queue.consumer_group's default


@contextmanager
def _listener(path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(path)
    try:
        yield listener
    finally:
        listener.close()


def _in_order(keys: list[str], expected: list[str]) -> bool:
    remaining = iter(keys)
    return all(k in remaining for k in expected)


def _config(tmp_path: Path, mqtt_port: int, redis_url: str) -> tuple[Path, str]:
    s = base_settings(make_project(tmp_path), tmp_path, mqtt_port)
    queue = unique("q")
    s["queue"] = {"broker": redis_url, "queue_name": queue}
    return write_config(tmp_path, s), queue


def _live(r: Any, queue: str) -> list[str]:
    """The worker names in the live workers' index (what ``status`` reads)."""
    return sorted(n.decode() for n in r.zrange(f"{{{queue}}}:workers", 0, -1))


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ------------------------------------------------------------------ unit file


def test_worker_unit_has_what_the_issue_asks_for() -> None:
    """A template, Type=notify, watchdog, restart, --processes, user and the daemon's hardening."""
    text = WORKER_UNIT.read_text()
    assert WORKER_UNIT.name.endswith("@.service")
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "Restart=on-failure",
        "KillMode=mixed",
        "worker --config /etc/flowerpower-daemon/config.yml "
        "--processes ${FLOWERPOWER_WORKER_PROCESSES}",
        "Environment=FLOWERPOWER_WORKER_PROCESSES=1",
        "User=flowerpower",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "Environment=HAMILTON_TELEMETRY_ENABLED=false",
    ):
        assert line in text, line


# ------------------------------------------------------------------ sd_notify


def test_worker_notifies_ready_watchdog_stopping(
    tmp_path: Path, mosquitto_session: Any, redis_server: Any
) -> None:
    """A worker says READY=1 once it consumes (it is in the consumer group then), pings
    WATCHDOG=1, says STOPPING=1 at SIGTERM and exits 0."""
    config, queue = _config(tmp_path, mosquitto_session.port, redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    with _listener(tmp_path / "notify.sock") as listener:
        env = {**NO_SYSTEMD, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
        with daemon(config, command="worker", env=env) as worker:
            listener.wait_for("READY", 60)
            consumers = r.xinfo_consumers(queue, GROUP)
            assert [c["name"].decode().rsplit("-", 1)[0] for c in consumers] == [
                f"{HOST}:{worker.proc.pid}"
            ]
            listener.wait_for("WATCHDOG", 10)
            listener.wait_for("WATCHDOG", 10)  # a steady ping
            worker.signal(signal.SIGTERM)
            assert listener.wait_for("STOPPING", 30)["STOPPING"] == "1"
            assert worker.wait(30) == 0, worker.log()[-3000:]
    assert _in_order(listener.keys(), ["READY", "WATCHDOG", "STOPPING"]), listener.keys()


def test_processes_2_supervises_two_consumers(
    tmp_path: Path, mosquitto_session: Any, redis_server: Any
) -> None:
    """``worker --processes 2``: READY=1 once both children consume (both listed live, neither
    the parent); a child killed, or stuck past the watchdog, is replaced; SIGTERM stops all:
    STOPPING=1, exit 0."""
    config, queue = _config(tmp_path, mosquitto_session.port, redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    log = (tmp_path / "workers.log").open("wb")
    with _listener(tmp_path / "notify.sock") as listener:
        env = {
            **os.environ,
            **NO_SYSTEMD,
            "HAMILTON_TELEMETRY_ENABLED": "false",
            "NOTIFY_SOCKET": str(listener.path),
            "WATCHDOG_USEC": "2000000",
        }
        parent = subprocess.Popen(
            [str(BIN / "flowerpower-daemon"), "worker", "-c", str(config), "--processes", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            ready = listener.wait_for("READY", 90)
            assert "2/2" in ready.get("STATUS", ""), ready
            names = _until(lambda: len(_live(r, queue)) == 2 and _live(r, queue), 10, "2 live")
            pids = [int(n.rsplit(":", 1)[1]) for n in names]
            assert parent.pid not in pids and all(n.startswith(f"{HOST}:") for n in names)
            assert len(r.xinfo_consumers(queue, GROUP)) == 2
            listener.wait_for("WATCHDOG", 10)
            # A child that dies unexpectedly is started again (after 1 s).
            os.kill(pids[0], signal.SIGKILL)
            _until(
                lambda: len(set(_live(r, queue)) - set(names)) == 1,
                60,
                "the killed child was not replaced",
            )
            # A child whose event loop stops (SIGSTOP: no more WATCHDOG=1 to the parent) is
            # killed once a watchdog period passed, and replaced.
            stuck = names[1]
            os.kill(int(stuck.rsplit(":", 1)[1]), signal.SIGSTOP)
            _until(
                lambda: len(set(_live(r, queue)) - set(names)) == 2,
                60,
                "the stuck child was not replaced",
            )
            children = sorted(set(_live(r, queue)) - set(names))
            assert parent.poll() is None
            parent.send_signal(signal.SIGTERM)
            assert listener.wait_for("STOPPING", 30)["STOPPING"] == "1"
            assert parent.wait(60) == 0
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait(10)
            log.close()
    text = (tmp_path / "workers.log").read_text(errors="replace")
    assert "worker_process_watchdog" in text
    assert "worker_process_died" in text and text.count("worker_process_stopped") == 2, text[-3000:]
    for name in children:  # the children are gone too, and left the listing as they stopped
        with pytest.raises(ProcessLookupError):
            os.kill(int(name.rsplit(":", 1)[1]), 0)
    # Only the killed children may still be listed, until their entries expire (10 s).
    assert set(_live(r, queue)) <= set(names)
