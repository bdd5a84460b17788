"""What the MQTT benchmarks share: their Mosquitto config, child processes, and client.

``e2e.py``, ``e2e_rows.py``, ``ab.py``, ``fleet.py`` and ``soak.py`` use
these (through ``e2e``, which re-exports them): a loopback Mosquitto config
(``set_tcp_nodelay true``, big queues, persistence off), children that are
always stopped (SIGTERM, then SIGKILL), bounded waits for a port or a line,
CPU time of a process, and the client that measures round trips and
throughput against a :class:`Target` (requests by sequence number, replies
matched back to them by one reader task).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "examples" / "sensors"
VENV_BIN = Path(sys.executable).parent
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
HOST = "127.0.0.1"

START_TIMEOUT = 120.0  # broker / echo / daemon must be ready within this (--start-timeout)
REPLY_TIMEOUT = 10.0  # one latency round trip
STALL_TIMEOUT = 30.0  # throughput run: longest wait for the next reply
THROUGHPUT_LIMIT = 600.0  # throughput run: longest run
STOP_TIMEOUT = 15.0  # SIGTERM -> SIGKILL (graceful shutdown is slow on a busy machine)

MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 100000
max_queued_bytes 0
max_inflight_messages 100
log_dest stderr
log_type error
log_type warning
"""

# The floor of e2e.py's first rows: a bare aiomqtt echo (QoS 1 in, QoS 1 out).
ECHO_SCRIPT = textwrap.dedent(
    """\
    import asyncio, logging, socket, sys
    import aiomqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.packettypes import PacketTypes

    logging.getLogger("echo.quiet").setLevel(logging.ERROR)  # "N pending publish calls"

    async def main(host, port, in_topic, out_topic, concurrency):
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = concurrency
        async with aiomqtt.Client(
            host, port, identifier="bench-echo", protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            max_inflight_messages=concurrency, properties=props, timeout=30,
            logger=logging.getLogger("echo.quiet"),
        ) as client:
            await client.subscribe(in_topic, qos=1)
            print("ready", flush=True)
            slots = asyncio.Semaphore(concurrency)
            tasks = set()

            async def echo(payload):
                try:
                    await client.publish(out_topic, payload, qos=1)
                finally:
                    slots.release()

            async for message in client.messages:
                await slots.acquire()
                task = asyncio.create_task(echo(message.payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    h, p, i, o, c = sys.argv[1:6]
    try:
        asyncio.run(main(h, int(p), i, o, int(c)))
    except KeyboardInterrupt:
        pass
    """
)


# Run the daemon's CLI under cProfile, the event-loop thread and every worker
# thread (pipelines run in anyio worker threads); stats are merged on exit. Wall
# clock by default; with BENCH_PROFILE_CLOCK=thread each thread's CPU time
# (``time.thread_time``: a waiting thread costs nothing).
PROFILE_SCRIPT = textwrap.dedent(
    """\
    import cProfile, os, pstats, sys, threading, time
    out, argv = sys.argv[1], sys.argv[2:]
    from flowerpower_daemon.cli import main  # import time is not profiled
    cpu = os.environ.get("BENCH_PROFILE_CLOCK") == "thread"
    profiles = []

    def profile():
        return cProfile.Profile(time.thread_time) if cpu else cProfile.Profile()

    def hook(frame, event, arg):
        p = profile()
        profiles.append(p)
        p.enable()  # replaces this hook in this thread

    threading.setprofile(hook)
    main_profile = profile()
    main_profile.enable()
    try:
        rc = main(argv)
    finally:
        main_profile.disable()
        threading.setprofile(None)
        stats = pstats.Stats(main_profile)
        for p in profiles:
            try:
                stats.add(p)
            except Exception:
                pass
        stats.dump_stats(out)
    sys.exit(rc)
    """
)


# --------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[Any], name: str) -> None:
    """SIGTERM, wait (bounded), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"[bench] {name} ignored SIGTERM for {STOP_TIMEOUT:g} s: killing", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def spawned(
    cmd: list[str], name: str, log_path: Path, **kwargs: Any
) -> Iterator[subprocess.Popen[Any]]:
    """A child process, its stderr (and stdout unless given) to ``log_path``; always stopped."""
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(cmd, stdout=kwargs.pop("stdout", log), stderr=log, **kwargs)
    except BaseException:
        log.close()
        raise
    try:
        yield proc
    finally:
        try:
            stop_process(proc, name)
        finally:
            log.close()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def wait_port(port: int, proc: subprocess.Popen[Any], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mosquitto not listening on {port} after {timeout} s:\n{tail(log)}")
        time.sleep(0.02)


def wait_line(proc: subprocess.Popen[bytes], expected: bytes, log: Path, timeout: float) -> None:
    """Wait (bounded) for ``expected`` on the child's stdout (a pipe)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while expected not in buf:
        if proc.poll() is not None:
            raise RuntimeError(f"echo exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"echo not ready after {timeout} s:\n{tail(log)}")
        with contextlib.suppress(BlockingIOError):
            buf += os.read(fd, 4096) or b""
        time.sleep(0.01)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time of a process and its threads (0 if it is gone)."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


# ----------------------------------------------------------------- client

Reply = tuple[float, dict[str, Any] | None]  # perf_counter at arrival, the daemon's result


@dataclass
class Sample:
    sent: float  # time.time() just before publish
    rtt_ms: float
    result: dict[str, Any] | None = None


@dataclass
class Target:
    """How to talk to one service: build a request, recognise its reply."""

    name: str
    out_topic: str
    request: Callable[[int], tuple[str, bytes]]
    reply_seq: Callable[[bytes], tuple[int, dict[str, Any] | None]]


@dataclass
class Client:
    """The benchmark's MQTT client: one reader task resolves futures by sequence number."""

    client: aiomqtt.Client
    waiting: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)
    target: Target | None = None
    errors: list[str] = field(default_factory=list)

    async def reader(self) -> None:
        async for message in self.client.messages:
            now = time.perf_counter()
            target = self.target
            if target is None or message.topic.value != target.out_topic:
                continue
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            try:
                seq, data = target.reply_seq(bytes(payload))
            except Exception as exc:  # a failed run or a foreign message: report, go on
                self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            fut = self.waiting.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result((now, data))

    def expect(self, seq: int) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting[seq] = fut
        return fut

    def _why(self) -> str:
        return f"errors: {self.errors[-3:]}" if self.errors else "no error replies"

    async def latency(self, target: Target, n: int, first_seq: int) -> list[Sample]:
        """``n`` sequential round trips."""
        self.target = target
        samples = []
        for seq in range(first_seq, first_seq + n):
            topic, payload = target.request(seq)
            fut = self.expect(seq)
            wall = time.time()
            t0 = time.perf_counter()
            await self.client.publish(topic, payload, qos=1)
            try:
                t1, data = await asyncio.wait_for(fut, REPLY_TIMEOUT)
            except TimeoutError:
                raise TimeoutError(
                    f"{target.name}: no reply to #{seq} within {REPLY_TIMEOUT} s; {self._why()}"
                ) from None
            samples.append(Sample(wall, (t1 - t0) * 1000.0, data))
        return samples

    async def throughput(self, target: Target, m: int, first_seq: int, window: int) -> float:
        """Publish ``m`` requests, at most ``window`` outstanding; msg/s until the last reply.

        Bounded twice: no reply for ``STALL_TIMEOUT`` s is a stall; the whole
        run may take at most ``THROUGHPUT_LIMIT`` s.
        """
        self.target = target
        slots = asyncio.Semaphore(window)
        futures: list[asyncio.Future[Reply]] = []
        senders: list[asyncio.Task[None]] = []
        deadline = time.monotonic() + THROUGHPUT_LIMIT

        async def send(seq: int, fut: asyncio.Future[Reply]) -> None:
            topic, payload = target.request(seq)
            await self.client.publish(topic, payload, qos=1)
            fut.add_done_callback(lambda _f: slots.release())

        def fail(what: str, done: int) -> TimeoutError:
            return TimeoutError(f"{target.name}: {what} after {done}/{m} replies; {self._why()}")

        t0 = time.perf_counter()
        try:
            for seq in range(first_seq, first_seq + m):
                wait = min(STALL_TIMEOUT, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(slots.acquire(), max(0.0, wait))
                except TimeoutError:
                    raise fail("no progress", sum(f.done() for f in futures)) from None
                fut = self.expect(seq)
                futures.append(fut)
                senders.append(asyncio.create_task(send(seq, fut)))
            pending: set[asyncio.Future[Reply]] = set(futures)
            while pending:
                wait = min(STALL_TIMEOUT, deadline - time.monotonic())
                _done, pending = await asyncio.wait(pending, timeout=max(0.0, wait))
                if pending and (not _done or time.monotonic() >= deadline):
                    raise fail("no progress" if not _done else "time limit", m - len(pending))
            await asyncio.gather(*senders)  # publish errors surface here
        finally:
            for task in senders:
                task.cancel()
        t_last = max(f.result()[0] for f in futures)
        return m / (t_last - t0)


# ------------------------------------------------------------------ misc


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered)) - 1))]


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
