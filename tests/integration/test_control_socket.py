"""The control socket itself: permissions, bad clients, load, one daemon per socket, peers."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from control_harness import NO_SYSTEMD, read_line, ready_daemon, request, wait_ready
from daemon_harness import DaemonProcess, configure, daemon, started
from services import MosquittoService

MAX_LINE = 4096


@pytest.fixture(scope="module")
def served(
    mosquitto_session: MosquittoService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, DaemonProcess, Path]]:
    """One daemon with a small line limit: (socket, process, config)."""
    tmp = tmp_path_factory.mktemp("sock")
    config = configure(tmp, mosquitto_session.port, control={"max_line_bytes": MAX_LINE})
    old = os.umask(0)  # the socket must be owner-only whatever the umask
    try:
        running = started(config, env=NO_SYSTEMD)
        proc = running.__enter__().proc
    finally:
        os.umask(old)
    try:
        wait_ready(config.sock, proc)
        yield config.sock, proc, config.path
        assert proc.proc.poll() is None, proc.log()[-3000:]
    finally:
        running.__exit__(None, None, None)


def _talk(sock: Path, *lines: bytes, timeout: float = 10) -> list[Any]:
    """Send raw lines on one connection; return one parsed answer per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        answers = []
        for line in lines:
            s.sendall(line)
            answers.append(orjson.loads(read_line(s)))
        return answers


def test_socket_is_owner_only_even_with_umask_0(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """The socket and its lock are 0600 and owned by the daemon's user, though umask was 0."""
    sock, _, _ = served
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(f"{sock}.lock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700


def test_garbage_gets_errors_and_the_connection_survives(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """Bad JSON, unknown commands and bad arguments get error answers on a live connection."""
    sock, _, _ = served
    answers = _talk(
        sock,
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"id": 1, "cmd": "frobnicate"}\n',
        b'{"id": 2, "cmd": "jobs", "args": {"limit": "ten"}}\n',
        b'{"id": 3, "cmd": "run", "args": {}}\n',
        b'{"id": 4, "cmd": "status", "args": {"extra": 1}}\n',
        b'{"id": true, "cmd": "ping"}\n',
        b'{"id": "x", "cmd": "job", "args": {"id": "nope"}}\n',
        b"\xff\xfe\n",
        b'{"id": 5, "cmd": "ping"}\n',
    )
    codes = [a.get("error", {}).get("code") for a in answers]
    assert codes == [
        "bad_json",
        "bad_json",
        "unknown_command",
        "bad_args",
        "bad_args",
        "bad_args",
        "bad_request",
        "not_found",
        "bad_json",
        None,
    ]
    assert answers[3]["id"] == 2 and "limit" in answers[3]["error"]["message"]
    assert answers[-1] == {
        "id": 5,
        "ok": True,
        "result": {"pong": True, "version": "0.1.0", "protocol": 1},
    }


def test_oversized_line_is_rejected_and_closed(served: tuple[Path, DaemonProcess, Path]) -> None:
    """A line over control.max_line_bytes gets too_large and the connection is closed."""
    sock, _, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        payload = b'{"id": 1, "cmd": "status", "args": {"x": "' + b"a" * (MAX_LINE * 4)
        try:
            s.sendall(payload)
        except BrokenPipeError:
            pass
        answer = orjson.loads(read_line(s))
        assert answer["error"]["code"] == "too_large"
        assert s.recv(1) == b""  # closed
    assert request(sock, "ping")["ok"]


def test_clients_that_vanish_mid_request_do_not_disturb_the_daemon(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """Half a line then a hang-up, or a hang-up during `run --wait`: the daemon goes on."""
    sock, proc, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(b'{"id": 1, "cmd": "sta')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(
            b'{"id": 1, "cmd": "run", "args": {"pipeline": "slow", '
            b'"inputs": {"seconds": 0.5}, "wait": true}}\n'
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(b'{"id": 1, "cmd": "events"}\n')
        read_line(s)
    assert request(sock, "ping")["ok"]
    status = request(sock, "status")["result"]
    assert status["state"] == "running"
    assert "Traceback" not in proc.log()


async def test_200_concurrent_clients_all_get_answers(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """200 clients connected at once each get their own answer."""
    sock, _, _ = served
    answers: list[Any] = []

    async def one(i: int) -> None:
        async with await anyio.connect_unix(sock) as stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(orjson.dumps({"id": i, "cmd": "status"}) + b"\n")
            answers.append(orjson.loads(await reader.receive_until(b"\n", 1 << 20)))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert len(answers) == 200
    assert sorted(a["id"] for a in answers) == list(range(200))
    assert all(a["ok"] and a["result"]["state"] == "running" for a in answers)


def test_a_second_daemon_on_the_same_socket_refuses(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """A second daemon with the same socket exits with a clear error; the first goes on."""
    sock, _, config = served
    with daemon(config, env=NO_SYSTEMD) as second:
        rc = second.wait(120)
        log = second.log()
    assert rc == 2, log
    assert "in use by another running daemon" in log
    assert "mqtt_connected" not in log  # refused before touching the broker
    assert request(sock, "ping")["ok"]
    assert stat.S_ISSOCK(os.stat(sock).st_mode)


def test_a_second_daemon_on_the_same_state_dir_refuses_whatever_its_socket(
    served: tuple[Path, DaemonProcess, Path],
) -> None:
    """Its own control socket does not let a second daemon share the first's state dir
    (outbox, dedup keys, timer state, schedules): exit 2 naming the dir and the way out."""
    sock, first, config = served
    short = Path(tempfile.mkdtemp(prefix="fp-"))  # a socket path has at most 107 bytes
    try:
        env = {**NO_SYSTEMD, "FLOWERPOWER_CONTROL__SOCKET": str(short / "other.sock")}
        with daemon(config, env=env) as second:
            rc = second.wait(120)
            log = second.log()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert rc == 2, log
    assert "is in use by another running daemon (pid" in log, log
    assert f"pid {first.proc.pid}); stop it first, or give this one its own state_dir" in log
    assert "state dir" in log and "mqtt_connected" not in log
    assert request(sock, "ping")["ok"]


def test_stale_socket_is_replaced_but_a_plain_file_is_not(
    mosquitto_session: MosquittoService, tmp_path: Path
) -> None:
    """A dead daemon's socket file is replaced; a regular file in its place is left alone."""
    config = configure(tmp_path, mosquitto_session.port)
    sock = config.sock
    sock.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))  # bound, never listening, then gone: what a crash leaves
    dead.close()
    with ready_daemon(config) as run:
        assert "stale_control_socket_replaced" in run.proc.log()
        assert request(sock, "ping")["ok"]
    sock.unlink(missing_ok=True)
    sock.write_text("not a socket")
    with daemon(config.path, env=NO_SYSTEMD) as proc:
        assert proc.wait(120) == 2
        assert "is not a socket" in proc.log()
    assert sock.read_text() == "not a socket"


_PEER_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"id": 1, "cmd": "ping"}\\n')
except BrokenPipeError:
    pass  # refused: the answer is already waiting
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_peer_credentials_are_checked(mosquitto_session: MosquittoService, tmp_path: Path) -> None:
    """With control.group, group members may connect; SO_PEERCRED refuses other gids."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run as another user")
    nogroup = 65534
    sock_dir = Path(tempfile.mkdtemp(prefix="fpctl"))
    try:
        os.chmod(sock_dir, 0o711)
        sock = sock_dir / "ctl.sock"
        control = {"socket": str(sock), "group": str(nogroup), "allowed_gids": [4242]}
        config = configure(tmp_path, mosquitto_session.port, control=control)
        with ready_daemon(config) as run:
            proc = run.proc
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nogroup

            def as_user(gid: int, extra: list[int]) -> dict[str, Any]:
                out = subprocess.run(
                    [python, "-c", _PEER_CLIENT, str(sock)],
                    user=65534,
                    group=gid,
                    extra_groups=extra,
                    capture_output=True,
                    timeout=60,
                    cwd=sock_dir,
                )
                assert out.returncode == 0, out.stderr.decode()
                return orjson.loads(out.stdout)  # type: ignore[no-any-return]

            refused = as_user(nogroup, [])
            assert refused["error"]["code"] == "forbidden"
            allowed = as_user(4242, [nogroup])  # in the socket's group, primary gid allowed
            assert allowed["ok"] is True
            assert "control_peer_rejected" in proc.log()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
