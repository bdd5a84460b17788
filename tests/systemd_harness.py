"""What the systemd tests share: a fake ``$NOTIFY_SOCKET`` and ``systemd-analyze`` on a unit."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAEMON_UNIT = REPO / "systemd" / "flowerpower-daemon.service"
WORKER_UNIT = REPO / "systemd" / "flowerpower-worker@.service"
DAEMON_TEMPLATE = REPO / "systemd" / "flowerpower-daemon@.service"


class NotifyListener:
    """A fake ``$NOTIFY_SOCKET``: collects a process's datagrams as dicts of assignments."""

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

    def keys(self, wanted: tuple[str, ...] = ("READY", "WATCHDOG", "STOPPING")) -> list[str]:
        """The ``wanted`` keys of every message so far, in the order they came."""
        return [k for m in self.messages for k in wanted if k in m]

    def close(self) -> None:
        self.sock.close()


def analyze() -> str:
    """The ``systemd-analyze`` binary, or skip."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed")
    return path


def unit_copy(unit: Path, tmp_path: Path) -> Path:
    """``unit`` (an instance, for a template) with ExecStart on an executable that exists."""
    text = unit.read_text().replace(
        "/usr/local/bin/flowerpower-daemon", str(Path(sys.executable).parent / "flowerpower-daemon")
    )
    copy = tmp_path / unit.name.replace("@.", "@1.")
    copy.write_text(text)
    return copy


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on a copy of ``unit``."""
    return subprocess.run(
        [analyze(), "verify", str(unit_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )


def exposure(unit: Path, tmp_path: Path) -> float:
    """``systemd-analyze security``'s overall exposure of ``unit`` (skip where it cannot rate)."""
    out = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", str(unit_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {out.stderr[-300:]}")
    return float(match.group(1))
