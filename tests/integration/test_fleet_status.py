"""Each daemon's availability is its own: a status topic per client id, and the fleet view."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from control_harness import CTL, NO_SYSTEMD, request, wait_ready
from daemon_harness import Config, client, configure, started, unique

pytestmark = pytest.mark.timeout(120)


def _config(tmp: Path, port: int, prefix: str) -> Config:
    return configure(tmp, port, mqtt={"status_topic": f"{prefix}/status/{{client_id}}"})


async def _retained(port: int, topic_filter: str, seconds: float = 0.5) -> dict[str, Any]:
    found: dict[str, Any] = {}
    async with client(port) as c:
        await c.subscribe(topic_filter, qos=1)
        with anyio.move_on_after(seconds):
            async for msg in c.messages:
                if msg.retain:
                    found[msg.topic.value] = orjson.loads(bytes(msg.payload))  # type: ignore[arg-type]
    return found


def _fleet(sock: Path) -> dict[str, Any]:
    answer = request(sock, "status", {"fleet": True})
    assert answer["ok"], answer
    return answer["result"]  # type: ignore[no-any-return]


async def test_each_daemon_has_its_status_and_the_fleet_view_lists_them(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Two daemons: one retained status each; one's SIGKILL marks only it offline."""
    prefix = unique("fleet")
    config_a = _config(tmp_path / "a", mosquitto.port, prefix)
    config_b = _config(tmp_path / "b", mosquitto.port, prefix)
    id_a, id_b, sock_a = config_a.tag, config_b.tag, config_a.sock
    with started(config_a, config_b, env=NO_SYSTEMD) as run:
        a, b = run.procs
        wait_ready(sock_a, a)
        wait_ready(config_b.sock, b)
        retained = await _retained(mosquitto.port, f"{prefix}/status/+")
        assert set(retained) == {f"{prefix}/status/{id_a}", f"{prefix}/status/{id_b}"}
        assert all(r["status"] == "online" for r in retained.values())
        assert retained[f"{prefix}/status/{id_b}"]["pid"] == b.proc.pid

        plain = request(sock_a, "status")["result"]
        assert "fleet" not in plain
        fleet = _fleet(sock_a)
        assert fleet["version"] == plain["version"]  # the daemon's own status, plus `fleet`
        view = fleet["fleet"]
        assert view["topic"] == f"{prefix}/status/+"
        assert view["workers"] == []
        rows = {d["client_id"]: d for d in view["daemons"]}
        assert set(rows) == {id_a, id_b}
        assert rows[id_a]["self"] and not rows[id_b]["self"]
        assert rows[id_a]["status"] == rows[id_b]["status"] == "online"
        assert rows[id_b]["pid"] == b.proc.pid and rows[id_b]["host"]
        assert rows[id_a]["topic"] == f"{prefix}/status/{id_a}"
        assert rows[id_a]["pipelines"]

        b.signal(signal.SIGKILL)  # its will: offline, on its own topic only
        b.wait(10)
        with anyio.fail_after(10):
            while True:
                rows = {d["client_id"]: d for d in _fleet(sock_a)["fleet"]["daemons"]}
                if rows[id_b]["status"] == "offline":
                    break
                await anyio.sleep(0.1)
        assert rows[id_a]["status"] == "online"
        assert a.proc.poll() is None
        shown = subprocess.run(
            [str(CTL), "--socket", str(sock_a), "status", "--fleet"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(id_a in line and "(this)" in line and "online" in line for line in lines), lines
    assert any(id_b in line and "offline" in line for line in lines), lines


def test_status_topic_keeps_a_literal_topic(tmp_path: Path) -> None:
    """A status_topic without {client_id} is used as it is; unknown fields are refused."""
    from flowerpower_daemon.settings import MqttSettings

    default = MqttSettings(client_id="d1")
    assert default.own_status_topic == "flowerpower/status/d1"
    assert default.fleet_status_filter == "flowerpower/status/+"
    literal = MqttSettings(client_id="d1", status_topic="plant/status")
    assert literal.own_status_topic == literal.fleet_status_filter == "plant/status"
    with pytest.raises(ValueError, match=r"unknown field\(s\) host"):
        MqttSettings(status_topic="s/{host}")
    with pytest.raises(ValueError, match="no wildcards"):
        MqttSettings(status_topic="s/+/x")
    with pytest.raises(ValueError, match="one topic level"):
        MqttSettings(client_id="site/d1")
    assert MqttSettings(client_id="site/d1", status_topic="s").own_status_topic == "s"
