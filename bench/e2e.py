"""End-to-end benchmark: the daemon against a bare aiomqtt echo, on a real Mosquitto.

Run from the repository root::

    .venv/bin/python bench/e2e.py            # --n 500 latency samples, --m 5000 messages
    .venv/bin/python bench/e2e.py --profile /tmp/daemon.prof   # + cProfile of the daemon
    .venv/bin/python bench/e2e.py --json /tmp/e2e.json          # + every row as JSON
    .venv/bin/python bench/e2e.py --n 200 --m 2000 --rounds 1 --idle-seconds 5 \
        --timer-fires 100 --file-events 20 --spawn-runs 1       # a quick run (~1 min)

One run starts, on a free loopback port, its own Mosquitto (``set_tcp_nodelay
true``, ``max_queued_messages 100000``, persistence off), then two
subprocesses:

- **echo**: a bare aiomqtt client (TCP_NODELAY, MQTT v5) that subscribes to
  ``bench/echo/in`` at QoS 1 and republishes each payload to
  ``bench/echo/out`` at QoS 1 (one task per message, at most 100 at once):
  the floor any MQTT request/response service pays on this machine;
- **daemon**: ``flowerpower-daemon run -c CONFIG`` with the example project
  ``examples/sensors`` and one MQTT trigger (pipeline ``temperature`` on
  ``sensors/{device}/temperature``); results come back on
  ``flowerpower/results/temperature``. The benchmark waits until it is ready
  (its retained ``online`` status, or else the first answer to a probe
  request) and warms it up with ``--warmup`` round trips (echo too).

This process is the client (TCP_NODELAY, MQTT v5; replies parsed with orjson, so
that the client takes as little of the two cores as it can) and measures, for both:

- latency: ``--n`` sequential round trips each (publish, wait for the matching
  reply), echo and daemon alternating one by one, p50/p99 in ms. Replies are
  matched by a sequence number: in the echo payload, and for the daemon in
  the ``{device}`` topic level (``sensors/b<seq>/temperature``), which the
  pipeline returns as ``outputs.device_id``;
- throughput: ``--m`` messages published at QoS 1 as fast as a window of
  ``--window`` outstanding requests allows, timed until the last reply; in
  ``--rounds`` rounds, echo and daemon in turn (the machine's speed drifts),
  reporting the median of each and the median of the per-round ratios;
- CPU time per message of the service and of the broker during that run.

For the daemon it also splits each round trip with the time stamps of the
result (``queued_at``, ``started_at``, ``finished_at``; same host, same
clock) and prints the daemon's RSS. Ratios are daemon/echo.

Then, each in a phase of its own (``e2e_rows.py``), the other rows of issue
13's speed table, each beside a floor measured in the same run: spawn ->
READY against python importing the same libraries (measured first, before
the daemon above starts), idle CPU and RSS of the warm daemon above (against
the same import floor), timer fire lateness against an anyio sleep-until
loop, file event -> run start against watchfiles ``awatch`` alone. The run
ends with the table (figure, floor, ratio, goal); ``--json FILE`` writes it
as one object keyed by row; ``--skip echo,spawn,idle,timer,file`` and the
``--idle-seconds``, ``--spawn-runs``, ``--timer-fires``, ``--file-events``
options make a quick run.

Every wait is bounded; every subprocess is terminated (then killed) on exit,
error or not. On a busy machine (load average above the CPU count, printed)
the absolute figures and the p99 are noise; p50 and the ratios hold up better.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_rows  # bench/ is not a package: found through sys.path
import table

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "examples" / "sensors"
VENV_BIN = Path(sys.executable).parent
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
HOST = "127.0.0.1"

ECHO_IN = "bench/echo/in"
ECHO_OUT = "bench/echo/out"
DAEMON_IN = "sensors/b{seq}/temperature"
DAEMON_OUT = "flowerpower/results/temperature"
STATUS_TOPIC = "flowerpower/status"

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
# thread (pipelines run in anyio worker threads); stats are merged on exit.
PROFILE_SCRIPT = textwrap.dedent(
    """\
    import cProfile, pstats, sys, threading
    out, argv = sys.argv[1], sys.argv[2:]
    from flowerpower_daemon.cli import main  # import time is not profiled
    profiles = []

    def hook(frame, event, arg):
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()  # replaces this hook in this thread

    threading.setprofile(hook)
    main_profile = cProfile.Profile()
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


def echo_target() -> Target:
    def request(seq: int) -> tuple[str, bytes]:
        return ECHO_IN, b'{"temperature": 21.5, "seq": %d}' % seq

    def reply_seq(payload: bytes) -> tuple[int, dict[str, Any] | None]:
        return int(orjson.loads(payload)["seq"]), None

    return Target("echo", ECHO_OUT, request, reply_seq)


def daemon_target() -> Target:
    def request(seq: int) -> tuple[str, bytes]:
        return DAEMON_IN.format(seq=seq), b'{"temperature": 21.5}'

    def reply_seq(payload: bytes) -> tuple[int, dict[str, Any] | None]:
        data = orjson.loads(payload)
        if data.get("status") != "success":
            raise RuntimeError(f"daemon run did not succeed: {payload[:500]!r}")
        return int(data["outputs"]["device_id"][1:]), data

    return Target("daemon", DAEMON_OUT, request, reply_seq)


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


async def wait_daemon_online(
    client: aiomqtt.Client, proc: subprocess.Popen[Any], log: Path, limit: float
) -> str:
    """Wait (bounded) until the daemon is ready; fail if it exits. Returns how we knew.

    Ready is its retained status message saying ``online``, or, should a
    daemon build not publish that, the first reply to a probe request (sent
    every 0.5 s; requests sent before it subscribed are simply lost).
    """
    await client.subscribe(STATUS_TOPIC, qos=1)
    await client.subscribe(DAEMON_OUT, qos=1)
    deadline = time.monotonic() + limit
    target = daemon_target()

    async def ready() -> str:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            if message.topic.value == STATUS_TOPIC:
                if json.loads(payload).get("status") == "online":
                    return "retained 'online' status"
            elif message.topic.value == DAEMON_OUT:
                seq, _ = target.reply_seq(bytes(payload))
                if seq < 0:
                    return "first probe reply (no 'online' status seen)"
        raise RuntimeError("MQTT message stream ended")

    task = asyncio.ensure_future(ready())
    probe = 0
    next_probe = time.monotonic() + 0.5
    try:
        while not task.done():
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{tail(log)}")
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"daemon not ready after {limit} s:\n{tail(log)}")
            if now >= next_probe:
                probe -= 1  # probes use negative sequence numbers: never a measured request
                await client.publish(*target.request(probe), qos=1)
                next_probe = now + 0.5
            await asyncio.wait([task], timeout=0.05)
        how = task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await client.unsubscribe(STATUS_TOPIC)
    return how


# ----------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered)) - 1))]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def breakdown(samples: list[Sample]) -> list[tuple[str, list[float]]]:
    """Split each daemon round trip with the result's time stamps (ms)."""
    parts: dict[str, list[float]] = {
        "publish -> queued_at (broker in, MQTT receive, dispatch)": [],
        "queued_at -> started_at (request build, taskiq, runner)": [],
        "started_at -> finished_at (thread hop + Hamilton execute)": [],
        "finished_at -> reply received (encode, publish, broker out)": [],
        "total round trip": [],
    }
    keys = list(parts)
    for s in samples:
        if s.result is None:
            continue
        r = s.result
        q, st, fi = ts(r["queued_at"]), ts(r["started_at"]), ts(r["finished_at"])
        recv = s.sent + s.rtt_ms / 1000.0
        values = (q - s.sent, st - q, fi - st, recv - fi, recv - s.sent)
        for key, value in zip(keys, values, strict=True):
            parts[key].append(value * 1000.0)
    return list(parts.items())


def print_report(res: dict[str, Any], args: argparse.Namespace) -> None:
    e, d = res["echo"], res["daemon"]
    rows = [
        ("latency p50 (ms)", e["p50"], d["p50"]),
        ("latency p99 (ms)", e["p99"], d["p99"]),
        ("latency mean (ms)", e["mean"], d["mean"]),
        ("throughput (msg/s)", e["tput"], d["tput"]),  # medians of the rounds
        ("service CPU/msg (ms)", e["cpu_ms"], d["cpu_ms"]),
        ("broker CPU/msg (ms)", e["broker_cpu_ms"], d["broker_cpu_ms"]),
        ("client CPU/msg (ms)", e["client_cpu_ms"], d["client_cpu_ms"]),
    ]
    print()
    print(f"e2e benchmark: n={args.n} sequential round trips, m={args.m} messages "
          f"(window {args.window}), MQTT v5, QoS 1, Mosquitto on {HOST}; daemon "
          f"max_concurrent_runs {args.max_concurrent_runs or 'default'}")
    load = os.getloadavg()
    cpus = os.cpu_count() or 1
    busy = "  (busy machine: figures are noisy)" if res["load_before"] > cpus else ""
    print(f"machine: {cpus} CPUs, load average {res['load_before']:.1f} before, "
          f"{load[0]:.1f} after{busy}")
    print(f"{'metric':<22}{'echo':>12}{'daemon':>12}{'ratio':>10}")
    for name, ev, dv in rows:
        fmt = "{:>12.0f}" if "msg/s" in name else "{:>12.3f}"
        ratio = f"{dv / ev:>10.2f}" if ev else f"{'-':>10}"
        print(f"{name:<22}" + fmt.format(ev) + fmt.format(dv) + ratio)
    print("ratio = daemon/echo (latency, CPU: lower is better; throughput: higher is better);")
    print(f"throughput: median of {args.rounds} rounds of {args.m} messages each, echo and "
          "daemon in turn;")
    print("CPU/msg = process CPU time during the throughput rounds / messages")
    ratios = res["tput_ratios"]
    print("throughput ratio per round: " + ", ".join(f"{r:.2f}" for r in ratios)
          + f"  (median {statistics.median(ratios):.2f})")
    print("(the goals are in the table at the end)")
    print()
    print("daemon round trip split by the result's time stamps (ms, latency run):")
    print(f"  {'segment':<62}{'p50':>9}{'p99':>9}")
    for name, values in breakdown(d["samples"]):
        if values:
            print(f"  {name:<62}{pct(values, 50):>9.3f}{pct(values, 99):>9.3f}")
    print()
    print(f"daemon RSS: {d['rss'] / 2**20:.1f} MiB (after {d['runs']} runs); "
          f"spawn -> ready: {d['startup_s']:.2f} s (by {d['ready_by']})")


def print_profile(path: Path, top: int) -> None:
    import pstats

    print()
    print(f"daemon profile (cProfile, all threads, run phase only; {path}):")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)


# ------------------------------------------------------------------- main


async def measure(
    port: int,
    args: argparse.Namespace,
    procs: dict[str, subprocess.Popen[Any]],
    daemon_log: Path,
    t_spawn: float,
) -> dict[str, Any]:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    quiet = logging.getLogger("bench.mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns "There are N pending publish calls."
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 65535
    async with aiomqtt.Client(
        HOST, port, identifier=f"bench-client-{os.getpid()}", protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY, max_inflight_messages=max(20, args.window), properties=props,
        timeout=30, logger=quiet,
    ) as mqtt:
        how = await wait_daemon_online(mqtt, procs["daemon"], daemon_log, args.start_timeout)
        startup_s = time.monotonic() - t_spawn
        await mqtt.subscribe(ECHO_OUT, qos=1)
        client = Client(mqtt)
        reader = asyncio.ensure_future(client.reader())
        broker = psutil.Process(procs["broker"].pid)
        me = psutil.Process()
        res: dict[str, Any] = {"load_before": os.getloadavg()[0]}
        if "echo" in args.skip:  # only warm the daemon up (for the idle and RSS rows)
            try:
                await client.latency(daemon_target(), max(args.warmup, 1), 0)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
            return res
        try:
            seq = 0
            targets = (echo_target(), daemon_target())
            for target in targets:
                print(f"[bench] {target.name}: {args.warmup} warm-up ...", file=sys.stderr,
                      flush=True)
                await client.latency(target, args.warmup, seq)
                seq += args.warmup
            # Latency: echo and daemon alternate round trip by round trip, so that both
            # see the same machine (its load moves within seconds when it is shared).
            print(f"[bench] {args.n} round trips each, alternating ...", file=sys.stderr,
                  flush=True)
            by_name: dict[str, list[Sample]] = {t.name: [] for t in targets}
            for i in range(args.n):
                for target in targets if i % 2 == 0 else targets[::-1]:
                    by_name[target.name] += await client.latency(target, 1, seq)
                    seq += 1
            for target in targets:
                samples = by_name[target.name]
                rtts = [s.rtt_ms for s in samples]
                res[target.name] = {
                    "p50": pct(rtts, 50), "p99": pct(rtts, 99), "mean": statistics.fmean(rtts),
                    "samples": samples, "runs": args.warmup + args.n + args.rounds * args.m,
                    "tputs": [], "cpu": [0.0, 0.0, 0.0],
                }
            # Throughput in rounds, echo and daemon in turn: the machine's speed drifts by
            # tens of percent over a minute, and a ratio of two runs far apart shows that.
            for r in range(args.rounds):
                for target in targets:
                    print(f"[bench] round {r + 1}/{args.rounds}: {target.name}, {args.m} "
                          "messages ...", file=sys.stderr, flush=True)
                    proc = procs[target.name]
                    service = psutil.Process(proc.pid)
                    cpu0 = (cpu_seconds(service), cpu_seconds(broker), cpu_seconds(me))
                    tput = await client.throughput(target, args.m, seq, args.window)
                    cpu1 = (cpu_seconds(service), cpu_seconds(broker), cpu_seconds(me))
                    seq += args.m
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"{target.name} exited during the run ({proc.returncode})"
                        )
                    t = res[target.name]
                    t["tputs"].append(tput)
                    spent = zip(t["cpu"], cpu0, cpu1, strict=True)
                    t["cpu"] = [a + (c1 - c0) for a, c0, c1 in spent]
            msgs = args.rounds * args.m
            for target in targets:
                t = res[target.name]
                t["tput"] = statistics.median(t["tputs"])
                t["cpu_ms"], t["broker_cpu_ms"], t["client_cpu_ms"] = (
                    c * 1000.0 / msgs for c in t["cpu"]
                )
            res["tput_ratios"] = [
                d / e for e, d in zip(res["echo"]["tputs"], res["daemon"]["tputs"], strict=True)
            ]
            res["daemon"]["rss"] = psutil.Process(procs["daemon"].pid).memory_info().rss
            res["daemon"]["startup_s"] = startup_s
            res["daemon"]["ready_by"] = how
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
        if client.errors:
            print(f"[bench] {len(client.errors)} bad replies, e.g. {client.errors[:3]}",
                  file=sys.stderr)
        return res


def run_services(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    tmp: Path,
    port: int,
    mosquitto: str,
    daemon_cmd: list[str],
) -> tuple[dict[str, Any], list[table.Row]]:
    """Start the broker, then each phase in turn (its processes stopped at its end): spawn
    samples, the daemon against the echo, idle, timers, files. Returns the echo comparison
    (empty with ``--skip echo``) and the rows of the issue's table."""
    procs: dict[str, subprocess.Popen[Any]] = {}
    rows: list[table.Row] = []
    procs["broker"] = stack.enter_context(spawned(
        [mosquitto, "-c", str(tmp / "mosquitto.conf")], "mosquitto", tmp / "mosquitto.log"))
    wait_port(port, procs["broker"], tmp / "mosquitto.log", args.start_timeout)
    daemon_bin = VENV_BIN / "flowerpower-daemon"
    modules: Path | None = None
    spawn_row: table.Row | None = None
    if not {"spawn", "idle"} <= args.skip:  # both need the census of the daemon's modules
        modules, spawn_row = asyncio.run(e2e_rows.spawn_phase(port, tmp, args, daemon_bin))
    with contextlib.ExitStack() as main_stack:
        t_spawn = time.monotonic()
        procs["daemon"] = main_stack.enter_context(
            spawned(daemon_cmd, "daemon", tmp / "daemon.log", cwd=tmp))
        if "echo" not in args.skip:
            procs["echo"] = main_stack.enter_context(spawned(
                [sys.executable, str(tmp / "echo.py"), HOST, str(port), ECHO_IN, ECHO_OUT,
                 "100"], "echo", tmp / "echo.log", stdout=subprocess.PIPE))
            wait_line(procs["echo"], b"ready", tmp / "echo.log", args.start_timeout)
        res = asyncio.run(measure(port, args, procs, tmp / "daemon.log", t_spawn))
        if "echo" not in args.skip:
            rows += e2e_rows.echo_rows(res)
        if "idle" not in args.skip:
            assert modules is not None
            rows += asyncio.run(e2e_rows.idle_phase(procs["daemon"].pid, modules, tmp, args))
        # SIGTERM now (graceful), so that a profiled daemon writes its stats.
        stop_process(procs["daemon"], "daemon")
    if "timer" not in args.skip:
        rows.append(asyncio.run(e2e_rows.timer_phase(port, tmp, args, daemon_bin)))
    if "file" not in args.skip:
        rows.append(asyncio.run(e2e_rows.file_phase(port, tmp, args, daemon_bin)))
    if spawn_row is not None:
        rows.append(spawn_row)
    return res, sorted(rows, key=lambda r: e2e_rows.ORDER.index(r.key))


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="latency samples (default 500)")
    parser.add_argument("--m", type=int, default=5000, help="throughput messages (default 5000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput rounds, echo and daemon in turn (default 3)")
    parser.add_argument("--window", type=int, default=100,
                        help="outstanding requests in the throughput run (default 100)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up round trips per service")
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT,
                        help=f"seconds for each process to be ready (default {START_TIMEOUT:g})")
    parser.add_argument("--max-concurrent-runs", type=int, default=None,
                        help="daemon max_concurrent_runs (default: the daemon's own; it is also "
                        "the MQTT receive maximum, i.e. the daemon's unacked-message window)")
    parser.add_argument("--profile", metavar="FILE", type=Path, default=None,
                        help="run the daemon under cProfile, write pstats to FILE, print the top")
    parser.add_argument("--profile-top", type=int, default=30, help="functions printed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--skip", default="", metavar="ROWS", help=e2e_rows.SKIP_HELP)
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="idle CPU window (default 30; 0: RSS only)")
    parser.add_argument("--spawn-runs", type=int, default=3,
                        help="spawn -> READY samples, daemon and import floor each (default 3)")
    parser.add_argument("--timer-fires", type=int, default=300,
                        help="interval fires measured (default 300)")
    parser.add_argument("--timer-every", type=float, default=0.05,
                        help="the interval trigger's period in seconds (default 0.05)")
    parser.add_argument("--file-events", type=int, default=50,
                        help="new files measured (default 50)")
    parser.add_argument("--json", metavar="FILE", type=Path, default=None,
                        help="write every figure, floor and ratio as one JSON object")
    args = parser.parse_args(argv)
    if min(args.n, args.m, args.window, args.rounds) < 1 or args.warmup < 0:
        parser.error("--n, --m, --window and --rounds must be >= 1, --warmup >= 0")
    if min(args.spawn_runs, args.timer_fires, args.file_events) < 1 or args.idle_seconds < 0 \
            or args.timer_every <= 0:
        parser.error("--spawn-runs, --timer-fires, --file-events must be >= 1, "
                     "--idle-seconds >= 0, --timer-every > 0")
    args.skip = e2e_rows.parse_skip(args.skip, parser.error)

    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    mosquitto = shutil.which("mosquitto", path=path)
    daemon_bin = VENV_BIN / "flowerpower-daemon"
    if mosquitto is None:
        print("mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    if not daemon_bin.exists():
        print(f"{daemon_bin} not found: pip install -e . in this venv", file=sys.stderr)
        return 2

    # Ctrl-C and SIGTERM unwind through the clean-up below (children are stopped).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    tmp = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    port = free_port()
    try:
        (tmp / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=port, host=HOST))
        (tmp / "echo.py").write_text(ECHO_SCRIPT)
        state = tmp / "state"
        state.mkdir()
        config = tmp / "daemon.yml"
        config.write_text(
            f"project: {json.dumps(str(PROJECT))}\n"
            f"state_dir: {json.dumps(str(state))}\n"
            f"mqtt: {{url: 'mqtt://{HOST}:{port}', client_id: bench-daemon, "
            f"status_topic: {STATUS_TOPIC}}}\n"
            "log_level: WARNING\n"
            + (f"max_concurrent_runs: {args.max_concurrent_runs}\n"
               if args.max_concurrent_runs else "")
            + "triggers:\n"
            "  - {name: temp, type: mqtt, pipeline: temperature, "
            "topic: 'sensors/{device}/temperature', qos: 1}\n"
        )
        daemon_cmd = [str(daemon_bin), "run", "-c", str(config)]
        if args.profile is not None:
            (tmp / "profile_daemon.py").write_text(PROFILE_SCRIPT)
            daemon_cmd = [sys.executable, str(tmp / "profile_daemon.py"),
                          str(args.profile.resolve()), "run", "-c", str(config)]
        load = os.getloadavg()
        t_start = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                res, rows = run_services(stack, args, tmp, port, mosquitto, daemon_cmd)
                if "echo" not in args.skip:
                    print_report(res, args)
        except (TimeoutError, RuntimeError, aiomqtt.MqttError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        table.print_table(rows)
        end = os.getloadavg()
        elapsed = time.monotonic() - t_start
        print(f"machine: {socket.gethostname()}, {os.cpu_count()} CPUs, load average "
              f"{load[0]:.2f} at the start, {end[0]:.2f} at the end; {elapsed:.0f} s")
        if args.json is not None:
            table.write_json(args.json, rows, {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"host": socket.gethostname(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                "load_average_before": load, "load_average_after": end,
                "elapsed_s": round(elapsed, 1),
                "args": {k: sorted(v) if isinstance(v, set) else
                         (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            })
            print(f"wrote {args.json}")
        if args.profile is not None:
            if args.profile.exists():
                print_profile(args.profile, args.profile_top)
            else:
                print(f"[bench] no profile written; daemon log:\n{tail(tmp / 'daemon.log')}",
                      file=sys.stderr)
        return 0
    finally:
        if args.keep:
            print(f"[bench] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
