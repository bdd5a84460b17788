"""Fault test 8: the control socket under garbage, huge lines and idle connections.

One daemon with a small line limit, a short idle timeout and a client cap.
hypothesis writes sessions of random bytes, invalid JSON and JSON of the
wrong shape (real command names with wrong arguments), some ending in half
a line; every complete non-blank line must get exactly one answer with a
known error code (or ``ok``). Huge lines get ``too_large``; 200 connections
that never send do not keep ``flowerpowerctl status`` from answering, and
the idle timeout closes them and gives their descriptors back.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from control_harness import ctl, read_line, ready_daemon, request
from daemon_harness import DaemonProcess, configure
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from services import MosquittoService

from flowerpower_daemon.control.protocol import COMMANDS, ERROR_CODES

pytestmark = pytest.mark.timeout(300)

MAX_LINE = 4096
IDLE_TIMEOUT = 3.0
MAX_CLIENTS = 256
IDLE_CLIENTS = 200
STATUS_BOUND = 10.0  # seconds for `flowerpowerctl status` (a process start included)
SESSIONS = 150

#: Commands a wrong-shaped request may name: none that stops, reloads, pauses or streams.
SAFE_COMMANDS = sorted(set(COMMANDS) - {"stop", "reload", "pause", "resume", "events"})


@pytest.fixture(scope="module")
def served(
    mosquitto_session: MosquittoService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, DaemonProcess]]:
    control = {"max_line_bytes": MAX_LINE, "idle_timeout": IDLE_TIMEOUT, "max_clients": MAX_CLIENTS}
    tmp = tmp_path_factory.mktemp("ctlfuzz")
    config = configure(tmp, mosquitto_session.port, log_level="WARNING", control=control)
    with ready_daemon(config) as run:
        yield config.sock, run.proc
        assert run.proc.proc.poll() is None, run.proc.log()[-3000:]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def clients(sock: Path) -> int:
    """Control connections the daemon serves now (this one included)."""
    return int(request(sock, "status")["result"]["control"]["clients"])


# ---------------------------------------------------------------- sessions

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def wrong_shape(draw: st.DrawFn) -> bytes:
    """A JSON request with a real (harmless) command and arguments of any shape."""
    cmd = draw(st.sampled_from(SAFE_COMMANDS) | st.text(max_size=10) | json_values)
    names = sorted(COMMANDS.get(cmd, {})) if isinstance(cmd, str) else []
    keys = (st.sampled_from(names) | st.text(max_size=6)) if names else st.text(max_size=6)
    args = draw(st.dictionaries(keys, json_values, max_size=4) | json_values)
    obj: dict[str, Any] = {"cmd": cmd, "args": args}
    if draw(st.booleans()):
        obj["id"] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=5))] = draw(json_values)
    if isinstance(args, dict) and args.get("wait") is True:
        args["wait"] = False  # never a `run --wait` stream
    return orjson.dumps(obj)


lines = st.one_of(
    st.binary(max_size=200),  # random bytes (may hold newlines: several lines)
    st.text(max_size=100).map(str.encode),  # text, hardly ever JSON
    json_values.map(orjson.dumps),  # valid JSON, mostly not an object
    wrong_shape(),
    st.just(b'{"id": 1, "cmd": "ping"}'),
)


def expected_answers(data: bytes) -> int:
    """How many answers ``data`` (ending in a newline) must get: its non-blank lines."""
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip())


def converse(sock: Path, data: bytes, tail: bytes) -> list[dict[str, Any]]:
    """Send ``data``, then a ping with a unique id, then ``tail`` (half a line); read to the ping."""
    end = f"end-{uuid.uuid4().hex}"
    answers: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(sock))
        s.sendall(data + orjson.dumps({"id": end, "cmd": "ping"}) + b"\n" + tail)
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"closed after {len(answers)} answers"
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            answer = orjson.loads(line)
            if answer.get("id") == end:
                assert answer["ok"], answer
                return answers
            answers.append(answer)


def test_garbage_sessions_each_line_gets_one_answer(served: tuple[Path, DaemonProcess]) -> None:
    """150 generated sessions: one well-formed answer per non-blank line; the daemon goes on."""
    sock, proc = served
    seen_codes: set[str] = set()
    total = {"lines": 0}

    @settings(
        max_examples=SESSIONS,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.lists(lines, min_size=1, max_size=12),
        st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    )
    def session(items: list[bytes], tail: bytes) -> None:
        data = b"".join(item + b"\n" for item in items)
        answers = converse(sock, data, tail)
        assert len(answers) == expected_answers(data), (data[:500], answers)
        for answer in answers:
            assert set(answer) >= {"id", "ok"}, answer
            if not answer["ok"]:
                assert answer["error"]["code"] in ERROR_CODES, answer
                seen_codes.add(answer["error"]["code"])
        total["lines"] += len(answers)

    session()
    # The generator yielded enough lines. The draw is derandomized but depends on
    # COMMANDS: adding the `dag` command moved it from just over 500 to 482 lines.
    assert total["lines"] > 400, total
    assert {"bad_json", "bad_request", "unknown_command", "bad_args"} <= seen_codes, seen_codes
    assert proc.proc.poll() is None
    assert ctl(sock, "status").rc == 0


@pytest.mark.parametrize("size", [MAX_LINE + 1, 10 * MAX_LINE, 1024 * 1024])
def test_huge_lines_get_too_large_and_are_closed(
    served: tuple[Path, DaemonProcess], size: int
) -> None:
    """A line over the limit (with or without its newline ever coming) is refused, then closed."""
    sock, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(sock))
        try:
            s.sendall(b"x" * size)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed while we were still writing: fine
        answer = orjson.loads(read_line(s))
        assert answer["error"]["code"] == "too_large"
    assert request(sock, "ping")["ok"]


def test_idle_connections_do_not_starve_status_and_are_closed(
    served: tuple[Path, DaemonProcess],
) -> None:
    """200 silent clients (and a few with half a line): status answers; the idle timeout frees them."""
    sock, proc = served
    time.sleep(IDLE_TIMEOUT + 1)  # earlier tests' leftovers are gone
    fds_before = fds(proc.proc.pid)
    idle: list[socket.socket] = []
    try:
        for i in range(IDLE_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(str(sock))
            if i % 20 == 0:
                s.sendall(b'{"id": 1, "cmd": "sta')  # a partial line, never finished
            idle.append(s)
        deadline = time.monotonic() + 10
        while clients(sock) < IDLE_CLIENTS + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert clients(sock) == IDLE_CLIENTS + 1
        res = ctl(sock, "status")
        assert res.rc == 0 and res.out["state"] == "running", res
        assert res.seconds < STATUS_BOUND, res.seconds

        # Over the cap: the next clients get a `busy` answer, not a hang.
        over = []
        for _ in range(MAX_CLIENTS - IDLE_CLIENTS + 5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(str(sock))
            over.append(s)
        busy = 0
        for s in over:
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if data:
                assert orjson.loads(data.split(b"\n")[0])["error"]["code"] == "busy"
                busy += 1
        assert busy >= 5, busy
        idle.extend(over)

        # The idle timeout closes every one of them; the daemon gives the descriptors back.
        t0 = time.monotonic()
        for s in idle:
            s.settimeout(IDLE_TIMEOUT + 20)
            try:
                while s.recv(4096):
                    pass  # a `busy` answer, or nothing: then EOF
            except ConnectionResetError:
                pass
        closed_after = time.monotonic() - t0
        assert closed_after < IDLE_TIMEOUT + 15, closed_after
    finally:
        for s in idle:
            s.close()
    assert clients(sock) == 1
    deadline = time.monotonic() + 10
    while fds(proc.proc.pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds(proc.proc.pid) <= fds_before + 2, (fds_before, fds(proc.proc.pid))
    res = ctl(sock, "status")
    assert res.rc == 0 and res.seconds < STATUS_BOUND, res
    assert "Traceback" not in proc.log(), proc.log()[-3000:]
