"""``pipeline run`` shows Hamilton's per-node progress bar on a terminal, and only there."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from daemon_harness import BIN, EXAMPLE

DAEMON = str(BIN / "flowerpower-daemon")
ENV = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false", "TERM": "xterm"}
#: What tqdm prints for the example's 5-node stats run (``unit="funcs"``).
BAR = "5/5"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "sensors"
    shutil.copytree(EXAMPLE, root)
    return root


def in_pty(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a new pseudo-terminal; (rc, screen text)."""
    master, slave = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on a 0-column one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed its end
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{args} still running after {timeout} s: {out[-2000:]!r}")
        return proc.wait(10), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def run_stats(project: Path, *extra: str) -> list[str]:
    return [DAEMON, "pipeline", "run", "stats", "--base-dir", str(project), *extra]


def test_a_terminal_sees_per_node_progress(project: Path) -> None:
    rc, screen = in_pty(*run_stats(project))
    assert rc == 0, screen
    assert "funcs" in screen and BAR in screen, screen
    assert "stats -> Execution Complete!" in screen, screen
    assert "stats: ok in" in screen  # the result follows the bar


def test_a_pipe_json_or_no_progress_sees_none(project: Path) -> None:
    piped = subprocess.run(
        run_stats(project),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert piped.returncode == 0, piped.stderr
    assert "stats: ok in" in piped.stdout
    assert "funcs" not in piped.stdout + piped.stderr and "\r" not in piped.stderr

    for extra in (("--format", "json"), ("--no-progress",)):
        rc, screen = in_pty(*run_stats(project, *extra))
        assert rc == 0, screen
        assert "funcs" not in screen and BAR not in screen, (extra, screen)


def test_a_failed_run_does_not_show_complete(project: Path) -> None:
    """A node that raises: the bar stops where it failed ("failed in boom"), never at
    "Execution Complete!" 100 % above the error line, attempt after attempt."""
    (project / "pipelines" / "fails.py").write_text(
        '"""Fails in its second node."""\n\n\n'
        "def first() -> int:\n    return 1\n\n\n"
        "def boom(first: int) -> int:\n    raise ValueError('no')\n"
    )
    (project / "conf" / "pipelines" / "fails.yml").write_text("run:\n  final_vars: [boom]\n")
    args = [DAEMON, "pipeline", "run", "fails", "--base-dir", str(project)]
    rc, screen = in_pty(*args, "--max-retries", "1", "--retry-delay", "0")
    assert rc == 1, screen
    assert "fails -> failed in boom" in screen, screen
    assert "attempt_failed" in screen, screen  # the retry ran, with its own bar
    assert "Execution Complete!" not in screen and "2/2" not in screen, screen
    assert "1/2" in screen, screen
