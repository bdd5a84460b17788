"""Start the real daemon (and workers) as subprocesses and talk to them over real MQTT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sensors"
BIN = Path(sys.executable).parent
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

EXTRA_PIPELINES = {
    "slow": (
        '"""Sleeps, then answers: for shutdown and overlap tests."""\nimport time\n\n\n'
        "def waited(seconds: float = 1.0) -> float:\n"
        '    """Sleep for `seconds`."""\n    time.sleep(seconds)\n    return seconds\n'
    ),
    "broken": (
        '"""Always fails: for error-path tests."""\n\n\n'
        "def boom(x: int = 1) -> int:\n"
        '    """Raise."""\n    raise RuntimeError(f"boom {x}")\n'
    ),
    "tagged": (
        '"""Sleeps, then returns the message id it was given: for delivery tests."""\n'
        "import time\n\n\n"
        "def msg(msg_id: int, seconds: float = 0.2) -> int:\n"
        '    """Sleep for `seconds`, return `msg_id`."""\n    time.sleep(seconds)\n    return msg_id\n'
    ),
    "touched": (
        '"""Runs on file events."""\n\n\n'
        "def seen(file_path: str, file_event: str) -> str:\n"
        '    """The path and event that triggered the run."""\n    return f"{file_event}:{file_path}"\n'
    ),
    "modal": (
        '"""Hamilton config picks the implementation (set per message by the hook)."""\n'
        "from hamilton.function_modifiers import config\n\n\n"
        '@config.when(mode="loud")\n'
        "def greeting__loud(name: str) -> str:\n"
        '    """Shout."""\n    return name.upper()\n\n\n'
        '@config.when_not(mode="loud")\n'
        "def greeting__quiet(name: str) -> str:\n"
        '    """Whisper."""\n    return name.lower()\n'
    ),
}

HOOKS = {
    "modal": (
        "def mqtt_build_config(payload, topic):\n"
        '    """Per-message Hamilton config from the payload."""\n'
        '    return {"mode": payload["mode"]} if "mode" in payload else {}\n'
    ),
}


def make_project(tmp: Path) -> Path:
    """A copy of the bundled example plus small test pipelines."""
    project = tmp / "project"
    shutil.copytree(EXAMPLE, project)
    for name, source in EXTRA_PIPELINES.items():
        (project / "pipelines" / f"{name}.py").write_text(source)
    for name, source in HOOKS.items():
        (project / "hooks" / name).mkdir(parents=True, exist_ok=True)
        (project / "hooks" / name / "hook.py").write_text(source)
    return project


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_config(tmp: Path, settings: Mapping[str, Any]) -> Path:
    path = tmp / f"{unique('daemon')}.yml"
    path.write_text(yaml.safe_dump(dict(settings)))
    return path


class DaemonProcess:
    """``flowerpower-daemon run|worker -c CONFIG`` as a child process, logs to a file."""

    def __init__(
        self, config: Path, command: str = "run", env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.command = command
        self.log_path = config.with_suffix(f".{command}.{uuid.uuid4().hex[:6]}.log")
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false", **(env or {})}
        self.proc = subprocess.Popen(
            [str(BIN / "flowerpower-daemon"), command, "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon did not exit within {timeout} s; log:\n{self.log()[-3000:]}"
            ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextmanager
def daemon(
    config: Path, command: str = "run", env: Mapping[str, str] | None = None
) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(config, command, env)
    try:
        yield proc
    finally:
        proc.close()


def client(port: int, *, v5: bool = True, identifier: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier or unique("test"),
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        socket_options=NODELAY,
    )


async def wait_online(
    c: aiomqtt.Client, status_topic: str, proc: DaemonProcess, timeout: float = 120
) -> dict[str, Any]:
    """Wait for the daemon's retained ``online`` status message (it is ready then)."""
    await c.subscribe(status_topic, qos=1)
    try:
        with anyio.fail_after(timeout):
            async for msg in c.messages:
                if msg.topic.matches(status_topic):
                    data = orjson.loads(msg.payload)  # type: ignore[arg-type]
                    if data.get("status") == "online":
                        return data  # type: ignore[no-any-return]
    except TimeoutError:
        raise AssertionError(
            f"daemon not online in {timeout} s; log:\n{proc.log()[-3000:]}"
        ) from None
    raise AssertionError("message stream ended")


async def collect(
    c: aiomqtt.Client, topic_filter: str, count: int, timeout: float
) -> list[tuple[str, dict[str, Any], Any]]:
    """The next ``count`` messages matching ``topic_filter`` (topic, JSON, properties)."""
    out: list[tuple[str, dict[str, Any], Any]] = []
    if count == 0:
        return out
    with anyio.fail_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                out.append((msg.topic.value, orjson.loads(msg.payload), msg.properties))  # type: ignore[arg-type]
                if len(out) >= count:
                    break
    return out


async def collect_for(
    c: aiomqtt.Client, topic_filter: str, seconds: float
) -> list[tuple[str, dict[str, Any]]]:
    """Every message matching ``topic_filter`` that arrives within ``seconds``."""
    out: list[tuple[str, dict[str, Any]]] = []
    with anyio.move_on_after(seconds):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                out.append((msg.topic.value, orjson.loads(msg.payload)))  # type: ignore[arg-type]
    return out


def base_settings(project: Path, tmp: Path, mqtt_port: int, **extra: Any) -> dict[str, Any]:
    """A daemon config for tests: unique client id and topics, quick shutdown."""
    tag = unique("fp")
    settings: dict[str, Any] = {
        "project": str(project),
        "state_dir": str(tmp / "state"),
        "log_level": "INFO",
        "log_format": "json",
        "shutdown_timeout": 10,
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "client_id": tag,
            "status_topic": f"{tag}/status",
            "result_topic": f"{tag}/results/{{pipeline}}",
            "error_topic": f"{tag}/errors/{{pipeline}}",
        },
        "triggers": [],
    }
    settings.update(extra)
    return settings


def mqtt_trigger(name: str, pipeline: str, topic: str, **options: Any) -> dict[str, Any]:
    """One MQTT trigger of a test config."""
    return {"name": name, "type": "mqtt", "pipeline": pipeline, "topic": topic, **options}


@dataclass
class Online:
    """A running daemon, a client that saw its retained ``online``, and its topic prefix."""

    proc: DaemonProcess
    client: aiomqtt.Client
    tag: str  # the daemon's client id; its status, results and errors topics start with it


@asynccontextmanager
async def online_daemon(
    tmp: Path, mqtt_port: int, triggers: list[dict[str, Any]], *, v5: bool = True, **extra: Any
) -> AsyncIterator[Online]:
    """The daemon on the test project with ``triggers`` (and settings ``extra``), ready."""
    settings = base_settings(make_project(tmp), tmp, mqtt_port, **extra)
    settings["triggers"] = triggers
    tag = settings["mqtt"]["client_id"]
    with daemon(write_config(tmp, settings)) as proc:
        async with client(mqtt_port, v5=v5) as c:
            await wait_online(c, f"{tag}/status", proc)
            yield Online(proc, c, tag)
