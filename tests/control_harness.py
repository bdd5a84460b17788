"""Drive a real daemon's control socket: ``flowerpowerctl`` as a subprocess, or raw lines."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from daemon_harness import BIN, Config, DaemonProcess, Running, started

CTL = BIN / "flowerpowerctl"


@dataclass
class CtlResult:
    rc: int
    out: Any
    err: str
    seconds: float


def ctl(sock: Path, *args: str, as_json: bool = True, timeout: float = 60) -> CtlResult:
    """Run ``flowerpowerctl --socket SOCK [--json] ARGS``; parse stdout as JSON when asked."""
    cmd = [str(CTL), "--socket", str(sock), *(["--json"] if as_json else []), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    text = proc.stdout.decode()
    out: Any = text
    if as_json and text.strip():
        try:
            out = orjson.loads(text)
        except orjson.JSONDecodeError:
            out = text
    return CtlResult(proc.returncode, out, proc.stderr.decode(), seconds)


def ok(sock: Path, *args: str, timeout: float = 60) -> Any:
    """``ctl`` that must succeed; returns the parsed answer."""
    res = ctl(sock, *args, timeout=timeout)
    assert res.rc == 0, f"flowerpowerctl {' '.join(args)} -> {res.rc}: {res.err}\n{res.out}"
    return res.out


def request(sock: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10) -> Any:
    """One request over a plain blocking socket; returns the answer object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(orjson.dumps({"id": 1, "cmd": cmd, "args": args or {}}) + b"\n")
        return orjson.loads(read_line(s))


def read_line(s: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


def wait_ready(sock: Path, proc: DaemonProcess, timeout: float = 120) -> dict[str, Any]:
    """Wait until the daemon's control socket says ``running`` (sources armed)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}"
            )
        try:
            answer = request(sock, "status", timeout=5)
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if answer.get("ok") and answer["result"]["state"] == "running":
                return answer["result"]  # type: ignore[no-any-return]
            last = answer
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready in {timeout} s ({last!r}); log:\n{proc.log()[-3000:]}")


def socket_of(state_dir: Path) -> Path:
    return state_dir / "control.sock"


#: Blank systemd variables for the daemon (a CI running under systemd must not leak them).
NO_SYSTEMD = {
    "NOTIFY_SOCKET": "",
    "WATCHDOG_USEC": "",
    "RUNTIME_DIRECTORY": "",
    "STATE_DIRECTORY": "",
}


@contextmanager
def ready_daemon(
    config: Config,
    *,
    workers: int = 0,
    env: Mapping[str, str] = NO_SYSTEMD,
    timeout: float = 120,
) -> Iterator[Running]:
    """The daemon of ``config`` (and ``workers`` workers), once its control socket says
    ``running``; stopped on exit."""
    with started(config, workers=workers, env=env) as run:
        wait_ready(config.sock, run.proc, timeout)
        yield run
