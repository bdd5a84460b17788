"""systemd integration: sd_notify as a real daemon speaks it, and the unit file's checks."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_harness import NO_SYSTEMD, ok, request, wait_ready
from daemon_harness import (
    client,
    configure,
    daemon,
    mqtt_trigger,
    started,
    unique,
    wait_online,
)
from services import MosquittoService, free_port
from systemd_harness import (
    DAEMON_TEMPLATE,
    DAEMON_UNIT,
    WORKER_UNIT,
    NotifyListener,
    exposure,
    verify,
)


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
    keys = listener.keys(("READY", "WATCHDOG", "RELOADING", "STOPPING"))
    # READY, then WATCHDOG, RELOADING, READY again, STOPPING: a subsequence of what came.
    expected = ["READY", "WATCHDOG", "RELOADING", "READY", "STOPPING"]
    remaining = iter(keys)
    assert all(k in remaining for k in expected), keys
    assert any("STATUS" in m and "ok" in m["STATUS"] for m in listener.messages)


@pytest.mark.parametrize(
    "unit", [DAEMON_UNIT, DAEMON_TEMPLATE, WORKER_UNIT], ids=["daemon", "daemon@", "worker"]
)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the daemon's unit and an instance of the worker's."""
    out = verify(unit, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "flowerpower-" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    "unit", [DAEMON_UNIT, DAEMON_TEMPLATE, WORKER_UNIT], ids=["daemon", "daemon@", "worker"]
)
def test_unit_exposure_is_at_most_2_5(
    unit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`systemd-analyze security` rates each unit's exposure 2.5 or lower."""
    level = exposure(unit, tmp_path)
    with capsys.disabled():
        print(f"\n[systemd] {unit.name} exposure level {level}")
    assert level <= 2.5


def test_unit_has_what_the_issue_asks_for() -> None:
    """Type=notify, watchdog, reload by SIGHUP, restart, directories, user and hardening."""
    text = DAEMON_UNIT.read_text()
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


def _instance_env(instance: str, tmp: Path) -> dict[str, str]:
    """What systemd gives instance ``instance`` of the daemon template: its ``Environment=``
    lines with ``%i`` and ``%H`` filled in, and ``$STATE_DIRECTORY`` / ``$RUNTIME_DIRECTORY``
    (created, as systemd does). ``control.group`` is left out: no such group here."""
    host = socket.gethostname()
    env = dict(NO_SYSTEMD)
    for line in DAEMON_TEMPLATE.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value.replace("%i", instance).replace("%H", host)
    del env["FLOWERPOWER_CONTROL__GROUP"]
    for name, sub in (("STATE_DIRECTORY", "state"), ("RUNTIME_DIRECTORY", "run")):
        path = tmp / sub / instance
        path.mkdir(parents=True, mode=0o700)
        env[name] = str(path)
    return env


async def test_template_instances_are_daemons_of_their_own(
    mosquitto_session: MosquittoService, tmp_path: Path
) -> None:
    """Two instances of ``flowerpower-daemon@.service`` on one config: each its own client
    id (``flowerpower-<host>-<instance>``, over the config's), status topic, state dir and
    control socket, as the template's environment sets them."""
    host = socket.gethostname()
    status = unique("st")
    trigger = mqtt_trigger("t", "temperature", f"{unique('in')}/+", shared_group=unique("g"))
    config = configure(
        tmp_path, mosquitto_session.port, [trigger], mqtt={"status_topic": f"{status}/{{client_id}}"}
    )
    envs = {i: _instance_env(i, tmp_path) for i in ("a", "b")}
    with daemon(config.path, env=envs["a"]) as a, daemon(config.path, env=envs["b"]) as b:
        async with client(mosquitto_session.port) as c:
            for instance, proc in (("a", a), ("b", b)):
                online = await wait_online(c, f"{status}/flowerpower-{host}-{instance}", proc)
                assert online["pid"] == proc.proc.pid, online
        for instance in ("a", "b"):
            sock = tmp_path / "run" / instance / "control.sock"
            info = ok(sock, "status")
            assert info["mqtt"]["client_id"] == f"flowerpower-{host}-{instance}", info
            assert info["state_dir"] == str(tmp_path / "state" / instance), info
            assert (tmp_path / "state" / instance / "daemon.lock").exists()
