"""The README's quick start, as written: config.example.yml with the embedded broker.

Nothing but the package (and its ``embedded`` extra) is needed: no Mosquitto,
no Redis. The embedded broker's port, the state dir and the control socket
are moved by environment variables (which win over the YAML) so that a
developer's own running daemon does not collide with the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import anyio
import orjson
import pytest

from tests.daemon_harness import BIN, DaemonProcess
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yml"

pytestmark = pytest.mark.timeout(300)


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "HAMILTON_TELEMETRY_ENABLED": "false",
        "FLOWERPOWER_MQTT__EMBEDDED_BIND": f"127.0.0.1:{port}",
        "FLOWERPOWER_STATE_DIR": str(tmp_path / "state"),
        "FLOWERPOWER_CONTROL__SOCKET": str(tmp_path / "ctl.sock"),
    }


def test_check_accepts_the_example_config_from_any_directory(tmp_path: Path) -> None:
    """`check -c config.example.yml` passes on a fresh clone (paths relative to the file)."""
    out = subprocess.run(
        [str(BIN / "flowerpower-daemon"), "check", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=_env(tmp_path, free_port()),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: 5 trigger(s)" in out.stdout


async def test_quick_start_request_gets_the_pipeline_result(tmp_path: Path) -> None:
    """run -c config.example.yml, then `request` a reading: the reply carries the outputs."""
    pytest.importorskip("amqtt", reason="the quick start needs the 'embedded' extra (amqtt)")
    port = free_port()
    env = _env(tmp_path, port)
    config = tmp_path / "config.example.yml"
    shutil.copy(EXAMPLE, config)
    # The copy must find the example project and its incoming/ dir like the original.
    text = config.read_text()
    text = text.replace("project: examples/sensors", f"project: {ROOT / 'examples/sensors'}")
    text = text.replace("path: examples/sensors/incoming", f"path: {tmp_path}")
    config.write_text(text)
    proc = DaemonProcess(config, env=env)
    try:
        reply = None
        with anyio.fail_after(180):
            while reply is None:
                assert proc.proc.poll() is None, proc.log()[-3000:]
                result = await anyio.run_process(
                    [
                        str(BIN / "flowerpower-daemon"),
                        "request",
                        "--url",
                        f"mqtt://127.0.0.1:{port}",
                        "--timeout",
                        "10",
                        "sensors/dev1/temperature",
                        '{"temperature": 31.5}',
                    ],
                    check=False,
                    env=env,
                )
                if result.returncode == 0:
                    reply = orjson.loads(result.stdout)
                else:
                    await anyio.sleep(0.5)  # the daemon (and its broker) is still starting
        assert reply["status"] == "success", reply
        assert reply["outputs"]["device_id"] == "dev1"
        assert reply["outputs"]["fahrenheit"] == pytest.approx(88.7)
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.log()[-3000:]
    finally:
        proc.close()


def test_embedded_broker_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    """With the embedded broker's port taken: one `error:` line naming port and key, exit 2."""
    pytest.importorskip("amqtt", reason="the embedded broker needs the 'embedded' extra (amqtt)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [str(BIN / "flowerpower-daemon"), "run", "-c", str(EXAMPLE)],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
            env=_env(tmp_path, port),
        )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("error: mqtt.embedded_bind: "), out.stderr
    assert f"port {port}" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
