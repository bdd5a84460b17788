"""Start the real daemon (and workers) as subprocesses and talk to them over real MQTT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiomqtt
import anyio
import orjson
import yaml
from services import stop_process

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sensors"
BIN = Path(sys.executable).parent
DAEMON = str(BIN / "flowerpower-daemon")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``flowerpower-daemon ARGS`` as a user runs it (no stdin, Hamilton telemetry off), its
    exit code and output as text (bounded: 120 s)."""
    return subprocess.run(
        [DAEMON, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )
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
        stop_process(self.proc)
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


def client(
    port: int, *, v5: bool = True, identifier: str | None = None, clean_session: bool = True
) -> aiomqtt.Client:
    """A test MQTT client; ``clean_session=False`` (MQTT 3.1.1) keeps what it missed while away."""
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier or unique("test"),
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if clean_session else False,
        socket_options=NODELAY,
    )


def watcher(port: int, identifier: str) -> aiomqtt.Client:
    """A persistent session (MQTT 3.1.1): what is published while it is away is kept for it."""
    return client(port, v5=False, identifier=identifier, clean_session=False)


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


class Message(NamedTuple):
    """One received message: its topic, its JSON payload, its MQTT properties."""

    topic: str
    data: dict[str, Any]
    properties: Any


async def collect(
    c: aiomqtt.Client, topic_filter: str, count: int, timeout: float
) -> list[Message]:
    """The next ``count`` messages matching ``topic_filter``."""
    out: list[Message] = []
    if count == 0:
        return out
    with anyio.fail_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                out.append(Message(msg.topic.value, orjson.loads(msg.payload), msg.properties))  # type: ignore[arg-type]
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


def base_settings(
    project: Path, tmp: Path, mqtt_port: int, *, tag: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A daemon config for tests: a unique client id (or ``tag``) that starts its topics,
    quick shutdown."""
    tag = tag or unique("fp")
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


@dataclass(frozen=True)
class Config:
    """A test config written to ``path``: its settings and the names tests take from them."""

    path: Path
    settings: dict[str, Any]
    port: int  # the MQTT broker's

    @property
    def tag(self) -> str:
        """The daemon's client id; its status, results and errors topics start with it."""
        return str(self.settings["mqtt"]["client_id"])

    @property
    def status_topic(self) -> str:
        return str(self.settings["mqtt"]["status_topic"])

    @property
    def results(self) -> str:
        """The filter for every result topic (``{pipeline}`` as ``#``)."""
        return str(self.settings["mqtt"]["result_topic"]).replace("{pipeline}", "#")

    @property
    def errors(self) -> str:
        """The filter for every error topic (``{pipeline}`` as ``#``)."""
        return str(self.settings["mqtt"]["error_topic"]).replace("{pipeline}", "#")

    @property
    def sock(self) -> Path:
        """The control socket: ``control.socket`` or the default in the state directory."""
        configured = self.settings.get("control", {}).get("socket")
        return Path(configured) if configured else Path(self.settings["state_dir"]) / "control.sock"


def configure(
    tmp: Path,
    mqtt_port: int,
    triggers: Sequence[Mapping[str, Any]] = (),
    *,
    project: Path | None = None,
    tag: str | None = None,
    mqtt: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Config:
    """Write a test config into ``tmp``: ``triggers`` on the test project (a fresh copy
    unless ``project`` is given), with settings ``extra`` and keys ``mqtt`` over the
    defaults of ``base_settings`` (client id ``tag`` if given, else a unique one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    settings = base_settings(project or make_project(tmp), tmp, mqtt_port, tag=tag, **extra)
    settings["triggers"] = [dict(t) for t in triggers]
    settings["mqtt"].update(mqtt or {})
    return Config(write_config(tmp, settings), settings, mqtt_port)


@dataclass
class Running:
    """Daemon processes (one per config, in order) and worker processes (on the first config)."""

    config: Config
    procs: list[DaemonProcess]
    workers: list[DaemonProcess]

    @property
    def proc(self) -> DaemonProcess:
        """The first config's daemon."""
        return self.procs[0]

    @property
    def tag(self) -> str:
        return self.config.tag


@contextmanager
def started(
    config: Config, *more: Config, workers: int = 0, env: Mapping[str, str] | None = None
) -> Iterator[Running]:
    """Start a daemon per config and ``workers`` workers on ``config``; stop them all on exit."""
    with ExitStack() as stack:
        procs = [stack.enter_context(daemon(c.path, env=env)) for c in (config, *more)]
        crew = [stack.enter_context(daemon(config.path, "worker", env)) for _ in range(workers)]
        yield Running(config, procs, crew)


@dataclass
class Online(Running):
    """Running daemons that said ``online``, and the client that saw it (the subscriber)."""

    client: aiomqtt.Client

    async def next_message(self, topic_filter: str, timeout: float = 30) -> Message:
        """The next message on ``topic_filter``; fails after ``timeout`` s with the log."""
        [message] = await self.collect(topic_filter, 1, timeout)
        return message

    async def collect(self, topic_filter: str, count: int, timeout: float) -> list[Message]:
        """The next ``count`` messages on ``topic_filter``; fails after ``timeout`` s with the log."""
        try:
            return await collect(self.client, topic_filter, count, timeout)
        except TimeoutError:
            raise AssertionError(
                f"not {count} messages on {topic_filter} in {timeout} s; "
                f"log:\n{self.proc.log()[-3000:]}"
            ) from None

    async def collect_for(
        self, topic_filter: str, seconds: float
    ) -> list[tuple[str, dict[str, Any]]]:
        """Every message on ``topic_filter`` within ``seconds`` (``collect_for`` on the subscriber)."""
        return await collect_for(self.client, topic_filter, seconds)


@asynccontextmanager
async def online_daemon(
    config: Config,
    *more: Config,
    subscribe: Sequence[str] = (),
    workers: int = 0,
    subscriber: aiomqtt.Client | None = None,
    v5: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> AsyncIterator[Online]:
    """The daemons of ``config`` and ``more`` (and ``workers`` workers), each ``online``.

    The subscriber (a new client, or ``subscriber``) subscribes to ``subscribe`` before
    the wait: messages that arrive before ``online`` are dropped, the rest are for the test.
    """
    with started(config, *more, workers=workers, env=env) as run:
        async with AsyncExitStack() as stack:
            c = subscriber or await stack.enter_async_context(client(config.port, v5=v5))
            for topic in subscribe:
                await c.subscribe(topic, qos=1)
            for cfg, proc in zip((config, *more), run.procs, strict=True):
                await wait_online(c, cfg.status_topic, proc, timeout)
            yield Online(run.config, run.procs, run.workers, c)
