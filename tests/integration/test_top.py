"""``flowerpowerctl top`` against a real daemon: in tmux (a real terminal), and in a pipe."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from control_harness import CTL, ready_daemon
from daemon_harness import client, configure, mqtt_trigger, unique
from services import MosquittoService, require_binary

ESC = "\x1b"


@dataclass
class Live:
    sock: Path
    port: int
    topic: str


@pytest.fixture(scope="module")
def live(
    mosquitto_session: MosquittoService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    topic = unique("top")
    triggers = [
        mqtt_trigger("temp", "temperature", f"{topic}/+/t"),
        mqtt_trigger("bad", "broken", f"{topic}/bad"),
    ]
    config = configure(tmp_path_factory.mktemp("top"), mosquitto_session.port, triggers)
    with ready_daemon(config) as run:
        yield Live(config.sock, config.port, topic)
        assert run.proc.proc.poll() is None, run.proc.log()[-3000:]


def send(live: Live, good: int, bad: int) -> None:
    """``good`` temperature readings and ``bad`` messages for the failing pipeline."""

    async def go() -> None:
        async with client(live.port) as c:
            for i in range(good):
                await c.publish(f"{live.topic}/dev{i}/t", b'{"temperature": 21.5}', qos=1)
            for _ in range(bad):
                await c.publish(f"{live.topic}/bad", b"{}", qos=1)

    anyio.run(go)


def row(screen: str, pipeline: str) -> list[str] | None:
    """The cells of ``pipeline``'s row in a snapshot (None when it has none)."""
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == pipeline:
            return cells
    return None


class Tmux:
    """A private tmux server running one command in an 160x40 pane."""

    def __init__(self, command: str, rc_file: Path, size: tuple[int, int] = (160, 40)) -> None:
        self.bin = require_binary("tmux")
        self.server = unique("fp-top")
        self.rc_file = rc_file
        wrapped = f"{command}; echo $? > {rc_file}"
        cols, lines = str(size[0]), str(size[1])
        self.tmux("new-session", "-d", "-x", cols, "-y", lines, "-s", "top", wrapped)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin, "-L", self.server, *args], capture_output=True, text=True, timeout=30
        )

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top").stdout

    def wait_for(self, check: str | re.Pattern[str], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if check.search(screen) if isinstance(check, re.Pattern) else check in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"not on screen within {timeout} s: {check!r}\n{screen}")

    def exit_code(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rc_file.exists() and self.rc_file.read_text().strip():
                return int(self.rc_file.read_text())
            time.sleep(0.1)
        raise AssertionError(f"top did not quit within {timeout} s:\n{self.screen()}")

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_in_a_terminal_counts_runs_and_quits_cleanly(
    live: Live, tmp_path: Path, quit_key: str
) -> None:
    term = Tmux(f"{CTL} --socket {live.sock} top", tmp_path / "rc")
    try:
        term.wait_for("(no runs seen yet)")
        send(live, good=3, bad=1)
        screen = term.wait_for(re.compile(r"^temperature\s+0\s+3\s+3\s+0\s", re.M))
        temp = row(screen, "temperature")
        assert temp is not None and temp[-1] == "success", screen
        screen = term.wait_for(re.compile(r"^broken\s+0\s+1\s+0\s+1\s", re.M))
        assert row(screen, "(all)")[1:5] == ["0", "4", "3", "1"], screen  # type: ignore[index]
        assert "flowerpower-daemon" in screen and "(q quits)" in screen
        term.tmux("send-keys", "-t", "top", quit_key)
        assert term.exit_code() == 0
    finally:
        term.close()


def test_top_in_a_small_terminal_fits_it(live: Live, tmp_path: Path) -> None:
    """In a 44x9 terminal every line is cut to the width and the view to the height, so
    nothing wraps or scrolls: the header stays on the first line, each row on its own."""
    term = Tmux(f"{CTL} --socket {live.sock} top --interval 0.3", tmp_path / "rc", (44, 9))
    try:
        term.wait_for("(no runs seen yet)")
        send(live, good=2, bad=1)
        screen = term.wait_for(re.compile(r"^broken\s+0\s+\d+\s+0\s+\d+\s", re.M))
        lines = screen.splitlines()
        assert lines[0].startswith("flowerpower-daemon "), screen
        firsts = {line.split()[0] for line in lines if line.strip()}
        assert firsts <= {
            "flowerpower-daemon",
            str(live.sock)[:43],
            "PIPELINE",
            "broken",
            "temperature",
            "(all)",
            "(q",
            "last",
        }, screen
        assert all(len(line) < 44 for line in lines), screen
        term.tmux("send-keys", "-t", "top", "q")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_top_in_a_pipe_prints_plain_snapshots(live: Live) -> None:
    proc = subprocess.Popen(
        [str(CTL), "--socket", str(live.sock), "top", "--interval", "1", "--iterations", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(1.2)  # the first snapshot is out: what follows is counted
    send(live, good=2, bad=0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert ESC not in out
    snapshots = [s for s in out.split("flowerpower-daemon ")[1:] if s.strip()]
    assert len(snapshots) == 4, out
    assert "(no runs seen yet)" in snapshots[0]
    last = row(snapshots[-1], "temperature")
    assert last is not None and last[2:5] == ["2", "2", "0"], out


def test_top_without_a_daemon_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(CTL), "--socket", str(tmp_path / "none.sock"), "top"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 3
    assert len(proc.stderr.splitlines()) == 1 and "is the daemon running?" in proc.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--interval", "0"], "error: flowerpowerctl top: --interval must be more than 0 s, not 0"),
        (["-n", "0"], "error: flowerpowerctl top: --iterations must be 1 or more, not 0"),
    ],
)
def test_top_bad_interval_or_iterations_is_one_error_line(
    tmp_path: Path, args: list[str], line: str
) -> None:
    """Like every other bad argument: one ``error:`` line naming the option, exit 2."""
    proc = subprocess.run(
        [str(CTL), "--socket", str(tmp_path / "none.sock"), "top", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]
