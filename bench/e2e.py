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
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_rows  # bench/ is not a package: found through sys.path
import table
from mqttbench import (  # also what ab.py, fleet.py and soak.py use as e2e.*
    ECHO_SCRIPT,
    HOST,
    MOSQUITTO_CONF,
    NODELAY,
    PROFILE_SCRIPT,
    PROJECT,
    START_TIMEOUT,
    VENV_BIN,
    Client,
    Sample,
    Target,
    _terminated,
    cpu_seconds,
    free_port,
    pct,
    spawned,
    stop_process,
    tail,
    wait_line,
    wait_port,
)
from table import print_profile, print_report

ECHO_IN = "bench/echo/in"
ECHO_OUT = "bench/echo/out"
DAEMON_IN = "sensors/b{seq}/temperature"
DAEMON_OUT = "flowerpower/results/temperature"
STATUS_TOPIC = "flowerpower/status"

# ----------------------------------------------------------------- client


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
        HOST,
        port,
        identifier=f"bench-client-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
        max_inflight_messages=max(20, args.window),
        properties=props,
        timeout=30,
        logger=quiet,
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
                print(
                    f"[bench] {target.name}: {args.warmup} warm-up ...", file=sys.stderr, flush=True
                )
                await client.latency(target, args.warmup, seq)
                seq += args.warmup
            # Latency: echo and daemon alternate round trip by round trip, so that both
            # see the same machine (its load moves within seconds when it is shared).
            print(
                f"[bench] {args.n} round trips each, alternating ...", file=sys.stderr, flush=True
            )
            by_name: dict[str, list[Sample]] = {t.name: [] for t in targets}
            for i in range(args.n):
                for target in targets if i % 2 == 0 else targets[::-1]:
                    by_name[target.name] += await client.latency(target, 1, seq)
                    seq += 1
            for target in targets:
                samples = by_name[target.name]
                rtts = [s.rtt_ms for s in samples]
                res[target.name] = {
                    "p50": pct(rtts, 50),
                    "p99": pct(rtts, 99),
                    "mean": statistics.fmean(rtts),
                    "samples": samples,
                    "runs": args.warmup + args.n + args.rounds * args.m,
                    "tputs": [],
                    "cpu": [0.0, 0.0, 0.0],
                }
            # Throughput in rounds, echo and daemon in turn: the machine's speed drifts by
            # tens of percent over a minute, and a ratio of two runs far apart shows that.
            for r in range(args.rounds):
                for target in targets:
                    print(
                        f"[bench] round {r + 1}/{args.rounds}: {target.name}, {args.m} "
                        "messages ...",
                        file=sys.stderr,
                        flush=True,
                    )
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
            print(
                f"[bench] {len(client.errors)} bad replies, e.g. {client.errors[:3]}",
                file=sys.stderr,
            )
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
    procs["broker"] = stack.enter_context(
        spawned([mosquitto, "-c", str(tmp / "mosquitto.conf")], "mosquitto", tmp / "mosquitto.log")
    )
    wait_port(port, procs["broker"], tmp / "mosquitto.log", args.start_timeout)
    daemon_bin = VENV_BIN / "flowerpower-daemon"
    modules: Path | None = None
    spawn_row: table.Row | None = None
    if not {"spawn", "idle"} <= args.skip:  # both need the census of the daemon's modules
        modules, spawn_row = asyncio.run(e2e_rows.spawn_phase(port, tmp, args, daemon_bin))
    with contextlib.ExitStack() as main_stack:
        t_spawn = time.monotonic()
        procs["daemon"] = main_stack.enter_context(
            spawned(daemon_cmd, "daemon", tmp / "daemon.log", cwd=tmp)
        )
        if "echo" not in args.skip:
            procs["echo"] = main_stack.enter_context(
                spawned(
                    [
                        sys.executable,
                        str(tmp / "echo.py"),
                        HOST,
                        str(port),
                        ECHO_IN,
                        ECHO_OUT,
                        "100",
                    ],
                    "echo",
                    tmp / "echo.log",
                    stdout=subprocess.PIPE,
                )
            )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="latency samples (default 500)")
    parser.add_argument("--m", type=int, default=5000, help="throughput messages (default 5000)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="throughput rounds, echo and daemon in turn (default 3)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=100,
        help="outstanding requests in the throughput run (default 100)",
    )
    parser.add_argument("--warmup", type=int, default=50, help="warm-up round trips per service")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT,
        help=f"seconds for each process to be ready (default {START_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-concurrent-runs",
        type=int,
        default=None,
        help="daemon max_concurrent_runs (default: the daemon's own; it is also "
        "the MQTT receive maximum, i.e. the daemon's unacked-message window)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        type=Path,
        default=None,
        help="run the daemon under cProfile, write pstats to FILE, print the top",
    )
    parser.add_argument("--profile-top", type=int, default=30, help="functions printed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--skip", default="", metavar="ROWS", help=e2e_rows.SKIP_HELP)
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="idle CPU window (default 30; 0: RSS only)"
    )
    parser.add_argument(
        "--spawn-runs",
        type=int,
        default=3,
        help="spawn -> READY samples, daemon and import floor each (default 3)",
    )
    parser.add_argument(
        "--timer-fires", type=int, default=300, help="interval fires measured (default 300)"
    )
    parser.add_argument(
        "--timer-every",
        type=float,
        default=0.05,
        help="the interval trigger's period in seconds (default 0.05)",
    )
    parser.add_argument(
        "--file-events", type=int, default=50, help="new files measured (default 50)"
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        default=None,
        help="write every figure, floor and ratio as one JSON object",
    )
    args = parser.parse_args(argv)
    if min(args.n, args.m, args.window, args.rounds) < 1 or args.warmup < 0:
        parser.error("--n, --m, --window and --rounds must be >= 1, --warmup >= 0")
    if (
        min(args.spawn_runs, args.timer_fires, args.file_events) < 1
        or args.idle_seconds < 0
        or args.timer_every <= 0
    ):
        parser.error(
            "--spawn-runs, --timer-fires, --file-events must be >= 1, "
            "--idle-seconds >= 0, --timer-every > 0"
        )
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
            + (
                f"max_concurrent_runs: {args.max_concurrent_runs}\n"
                if args.max_concurrent_runs
                else ""
            )
            + "triggers:\n"
            "  - {name: temp, type: mqtt, pipeline: temperature, "
            "topic: 'sensors/{device}/temperature', qos: 1}\n"
        )
        daemon_cmd = [str(daemon_bin), "run", "-c", str(config)]
        if args.profile is not None:
            (tmp / "profile_daemon.py").write_text(PROFILE_SCRIPT)
            daemon_cmd = [
                sys.executable,
                str(tmp / "profile_daemon.py"),
                str(args.profile.resolve()),
                "run",
                "-c",
                str(config),
            ]
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
        print(
            f"machine: {socket.gethostname()}, {os.cpu_count()} CPUs, load average "
            f"{load[0]:.2f} at the start, {end[0]:.2f} at the end; {elapsed:.0f} s"
        )
        if args.json is not None:
            table.write_json(
                args.json,
                rows,
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": {
                        "host": socket.gethostname(),
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                    },
                    "load_average_before": load,
                    "load_average_after": end,
                    "elapsed_s": round(elapsed, 1),
                    "args": {
                        k: sorted(v)
                        if isinstance(v, set)
                        else (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()
                    },
                },
            )
            print(f"wrote {args.json}")
        if args.profile is not None:
            if args.profile.exists():
                print_profile(args.profile, args.profile_top)
            else:
                print(
                    f"[bench] no profile written; daemon log:\n{tail(tmp / 'daemon.log')}",
                    file=sys.stderr,
                )
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
