"""systemd integration: sd_notify as a real daemon speaks it, and the unit file's checks."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_harness import NO_SYSTEMD, request, wait_ready
from daemon_harness import configure, started
from services import MosquittoService, free_port

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "flowerpower-daemon.service"


class NotifyListener:
    """A fake ``$NOTIFY_SOCKET``: collects the daemon's datagrams as lists of assignments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        """Receive until a message with ``key`` arrives (bounded); return it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {key} within {timeout} s; got {self.messages}"
            self.sock.settimeout(left)
            data = self.sock.recv(4096).decode()
            message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


def test_notify_ready_watchdog_reloading_stopping_in_order(
    mosquitto_session: MosquittoService, tmp_path: Path
) -> None:
    """The daemon tells systemd READY, then WATCHDOG pings, RELOADING+READY on SIGHUP, STOPPING."""
    hourly = {"name": "t", "type": "interval", "every": "1h", "pipeline": "stats"}
    config = configure(tmp_path, mosquitto_session.port, [hourly])
    listener = NotifyListener(tmp_path / "notify.sock")
    env = {**NO_SYSTEMD, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
    try:
        with started(config, env=env) as run:
            proc = run.proc
            ready = listener.wait_for("READY", 120)
            assert "triggers" in ready.get("STATUS", "") or ready["READY"] == "1"
            status = wait_ready(config.sock, proc)
            assert status["state"] == "running"
            listener.wait_for("WATCHDOG", 10)
            listener.wait_for("WATCHDOG", 10)  # a steady ping, not a one-off
            proc.signal(signal.SIGHUP)
            reloading = listener.wait_for("RELOADING", 60)
            assert int(reloading["MONOTONIC_USEC"]) > 0
            listener.wait_for("READY", 60)
            proc.signal(signal.SIGTERM)
            stopping = listener.wait_for("STOPPING", 60)
            assert stopping["STOPPING"] == "1"
            assert proc.wait(60) == 0
    finally:
        listener.close()
    keys = [
        k
        for m in listener.messages
        for k in ("READY", "WATCHDOG", "RELOADING", "STOPPING")
        if k in m
    ]
    # READY, then WATCHDOG, RELOADING, READY again, STOPPING: a subsequence of what came.
    expected = ["READY", "WATCHDOG", "RELOADING", "READY", "STOPPING"]
    remaining = iter(keys)
    assert all(k in remaining for k in expected), keys
    assert any("STATUS" in m and "ok" in m["STATUS"] for m in listener.messages)


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed")
    return path


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    daemon_bin = shutil.which("flowerpower-daemon") or str(
        Path(__import__("sys").executable).parent / "flowerpower-daemon"
    )
    text = UNIT.read_text().replace("/usr/local/bin/flowerpower-daemon", daemon_bin)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit."""
    analyze = _analyze()
    out = subprocess.run(
        [analyze, "verify", str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "flowerpower-daemon.service" not in out.stderr, out.stderr


def test_unit_exposure_is_at_most_2_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`systemd-analyze security` rates the unit's exposure 2.5 or lower."""
    analyze = _analyze()
    out = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {out.stderr[-300:]}")
    with capsys.disabled():
        print(f"\n[systemd] exposure level {match.group(1)}")
    assert float(match.group(1)) <= 2.5


def test_unit_has_what_the_issue_asks_for() -> None:
    """Type=notify, watchdog, reload by SIGHUP, restart, directories, user and hardening."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RuntimeDirectory=flowerpower-daemon",
        "StateDirectory=flowerpower-daemon",
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


def test_not_ready_until_mqtt_is_connected_and_subscribed(
    mosquitto_factory: Callable[..., MosquittoService], tmp_path: Path
) -> None:
    """With the broker unreachable the daemon keeps trying and is not ready: no READY=1, no
    daemon_ready, status 'starting'; once a broker listens on the port, all three follow."""
    port = free_port()
    config = configure(
        tmp_path,
        port,
        [{"name": "t", "type": "interval", "every": "1h", "pipeline": "stats"}],
        mqtt={"reconnect_max": 0.5},
    )
    listener = NotifyListener(tmp_path / "notify.sock")
    sock = config.sock
    env = {**NO_SYSTEMD, "NOTIFY_SOCKET": str(listener.path)}
    try:
        with started(config, env=env) as run:
            proc = run.proc
            deadline = time.monotonic() + 60
            while "mqtt_disconnected" not in proc.log():  # it has tried, and failed
                assert proc.proc.poll() is None, proc.log()[-3000:]
                assert time.monotonic() < deadline, proc.log()[-3000:]
                time.sleep(0.05)
            with pytest.raises((AssertionError, TimeoutError)):  # nothing, or no READY
                listener.wait_for("READY", 3.0)
            assert "daemon_ready" not in proc.log()
            status = request(sock, "status")
            assert status["ok"] and status["result"]["state"] == "starting"
            assert status["result"]["mqtt"]["connected"] is False
            refused = request(sock, "triggers")
            assert refused["error"]["code"] == "unavailable"
            mosquitto_factory(port=port)
            ready = listener.wait_for("READY", 60)
            assert ready["READY"] == "1"
            assert wait_ready(sock, proc)["mqtt"]["connected"] is True
            assert "daemon_ready" in proc.log()
            proc.signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    finally:
        listener.close()
