"""The rows of ``e2e.py``'s table beyond the echo comparison, each beside a floor of the same run.

``e2e.py`` imports this. Each phase starts what it measures (daemons with
configs of their own, floor processes) on the benchmark's Mosquitto, bounds
every wait and stops every child on the way out (bench/README.md describes
the rows):

- ``spawn_to_ready``: ``flowerpower-daemon run`` spawned -> its retained
  ``online`` received, against python importing the modules the daemon had
  loaded (its ``sys.modules`` at exit in a census run; its own and the
  project's left out) spawned -> ``ready``; in pairs, the order alternating.
- ``idle_cpu_30s``, ``rss_after_warmup``: the warm main daemon left alone
  ``--idle-seconds``, beside an import-floor process over the same seconds.
- ``timer_fire_lateness_p99``: interval (and cron) runs' ``started_at``
  minus the ``scheduled`` time they name, against an anyio sleep-until loop
  on the same grid at the same time (wake minus deadline).
- ``file_event_to_run_start_p50``: a new file -> the run's ``started_at``,
  against watchfiles ``awatch`` alone with the daemon's parameters on the
  same directory at the same time; files a random 50-150 ms apart (the
  watchers step every 50 ms).
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import json
import random
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import mqttbench
import psutil
from mqttbench import pct
from table import Row, ratio_row

IMPORT_FLOOR_SCRIPT = textwrap.dedent(
    """\
    import importlib, os, signal, sys
    # Exactly the daemon's modules: the census lists the Hamilton plugins it loaded, and
    # Hamilton's autoload would add the others installed (mlflow's: ~970 modules) that it
    # leaves out.
    os.environ["HAMILTON_AUTOLOAD_EXTENSIONS"] = "0"
    names = open(sys.argv[1]).read().split()
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    print("ready", len(names), len(failed), flush=True)
    while True:
        signal.pause()
    """
)

# Runs the daemon's CLI as its console script does, and writes its sys.modules at exit.
CENSUS_SCRIPT = textwrap.dedent(
    """\
    import atexit, sys
    out, argv = sys.argv[1], sys.argv[2:]

    def dump():
        with open(out, "w") as f:
            for name, mod in list(sys.modules.items()):
                f.write(f"{name}\\t{getattr(mod, '__file__', None) or ''}\\n")

    atexit.register(dump)
    from flowerpower_daemon.cli import main
    sys.exit(main(argv))
    """
)

SLEEP_FLOOR_SCRIPT = textwrap.dedent(
    """\
    import json, sys, time
    import anyio, anyio.lowlevel

    async def main(every, n):
        start = time.time()
        late = []
        for k in range(1, n + 1):
            deadline = start + k * every
            remaining = deadline - time.time()
            if remaining <= 0:
                await anyio.lowlevel.checkpoint()
            while remaining > 0:
                await anyio.sleep(remaining)
                remaining = deadline - time.time()
            late.append((time.time() - deadline) * 1000.0)
        print(json.dumps(late), flush=True)

    anyio.run(main, float(sys.argv[1]), int(sys.argv[2]))
    """
)

AWATCH_FLOOR_SCRIPT = textwrap.dedent(
    """\
    import sys, time
    import anyio
    from watchfiles import awatch

    async def main(path, debounce, step):
        print("ready", flush=True)
        watch = awatch(path, watch_filter=lambda change, p: p.endswith(".txt"),
                       debounce=debounce, step=step)
        async for batch in watch:
            now = time.time()
            for p in sorted({p for _change, p in batch}):  # added + modified: one line
                print(repr(now), p, flush=True)

    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    """
)


# ------------------------------------------------------------- processes


@contextlib.asynccontextmanager
async def child(cmd: list[str], log: Path, **kw: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child whose stdout is a pipe (lines read with a precise arrival time); always stopped."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=err, **kw)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), mqttbench.STOP_TIMEOUT)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()


async def line(proc: asyncio.subprocess.Process, limit: float, what: str, log: Path) -> str:
    """The child's next stdout line (within ``limit`` s); fails with its log if it ends first."""
    assert proc.stdout is not None
    try:
        raw = await asyncio.wait_for(proc.stdout.readline(), limit)
    except TimeoutError:
        raise TimeoutError(
            f"{what}: no output within {limit:g} s:\n{mqttbench.tail(log)}"
        ) from None
    if not raw:
        raise RuntimeError(f"{what} exited ({await proc.wait()}):\n{mqttbench.tail(log)}")
    return raw.decode().strip()


def daemon_config(tmp: Path, name: str, port: int, triggers: list[dict[str, Any]]) -> Path:
    """A daemon config of its own (client id, status topic ``bench/<name>/status``, state dir)."""
    state = tmp / f"state-{name}"
    state.mkdir(exist_ok=True)
    cfg = {
        "project": str(mqttbench.PROJECT),
        "state_dir": str(state),
        "log_level": "WARNING",
        "mqtt": {
            "url": f"mqtt://{mqttbench.HOST}:{port}",
            "client_id": f"bench-{name}",
            "status_topic": f"bench/{name}/status",
        },
        "triggers": triggers,
    }
    path = tmp / f"{name}.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


class Inbox:
    """One MQTT client's messages, queued per exact topic with their arrival time (time.time)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.queues: dict[str, asyncio.Queue[tuple[float, dict[str, Any]]]] = {}

    async def listen(self, topic: str) -> None:
        self.queues.setdefault(topic, asyncio.Queue())
        await self.client.subscribe(topic, qos=1)

    async def run(self) -> None:
        async for message in self.client.messages:
            now = time.time()
            queue = self.queues.get(message.topic.value)
            if queue is not None:
                assert isinstance(message.payload, bytes | bytearray)
                queue.put_nowait((now, json.loads(message.payload)))

    async def get(
        self, topic: str, limit: float, proc: subprocess.Popen[Any], log: Path
    ) -> tuple[float, dict[str, Any]]:
        """The next message on ``topic`` (within ``limit`` s), failing if ``proc`` exits."""
        deadline = time.monotonic() + limit
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({proc.returncode}):\n{mqttbench.tail(log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing on {topic} within {limit:g} s:\n{mqttbench.tail(log)}")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.queues[topic].get(), 0.2)

    async def online(
        self, name: str, proc: subprocess.Popen[Any], log: Path, limit: float
    ) -> float:
        """When (time.time) daemon ``name``'s ``online`` status arrived (within ``limit`` s)."""
        deadline = time.monotonic() + limit
        while True:
            left = max(0.0, deadline - time.monotonic())
            t, data = await self.get(f"bench/{name}/status", left, proc, log)
            if data.get("status") == "online":
                return t


@contextlib.asynccontextmanager
async def inbox(port: int, name: str) -> AsyncIterator[Inbox]:
    async with aiomqtt.Client(
        mqttbench.HOST,
        port,
        identifier=f"bench-{name}-client",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=mqttbench.NODELAY,
        timeout=30,
    ) as client:
        box = Inbox(client)
        task = asyncio.ensure_future(box.run())
        try:
            yield box
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.contextmanager
def daemon(cmd: list[str], name: str, tmp: Path) -> Iterator[subprocess.Popen[Any]]:
    with mqttbench.spawned(cmd, name, tmp / f"{name}.log", cwd=tmp) as proc:
        yield proc


def iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def cpu(proc: psutil.Process) -> float:
    return mqttbench.cpu_seconds(proc)


# ---------------------------------------------------------------- phases

MQTT_TRIGGER = {
    "name": "temp",
    "type": "mqtt",
    "pipeline": "temperature",
    "topic": "sensors/{device}/temperature",
    "qos": 1,
}


async def spawn_phase(port: int, tmp: Path, args: Any, daemon_bin: Path) -> tuple[Path, Row | None]:
    """The census run (which modules the daemon loads), then daemon / import floor spawns in
    pairs, which goes first alternating (the machine's load drifts: the ratio is the median
    of the pairs')."""
    modules = tmp / "modules.txt"
    census = tmp / "census.tsv"
    (tmp / "census.py").write_text(CENSUS_SCRIPT)
    (tmp / "import_floor.py").write_text(IMPORT_FLOOR_SCRIPT)
    daemon_s: list[float] = []
    floor_s: list[float] = []
    imported = [""]

    async def spawn_daemon(box: Inbox, name: str, cmd: list[str]) -> float:
        print(f"[bench] spawn -> ready: {name} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        with daemon(cmd, name, tmp) as proc:
            t1 = await box.online(name, proc, tmp / f"{name}.log", args.start_timeout)
            await asyncio.to_thread(mqttbench.stop_process, proc, name)
        return t1 - t0

    async def spawn_floor(i: int) -> float:
        log = tmp / f"import-floor{i}.log"
        t0 = time.time()
        async with child([sys.executable, str(tmp / "import_floor.py"), str(modules)], log) as f:
            imported[0] = await line(f, args.start_timeout, "import floor", log)
            return time.time() - t0

    # Our modules and the project's as an installed daemon finds them: byte-compiled (pip
    # compiles a wheel's modules at install; the libraries the floor imports are). Without
    # it, under PYTHONDONTWRITEBYTECODE=1 (set on this machine), every spawn compiled ~110
    # of our modules from source (~0.1 s) that the floor never has to.
    for tree in (mqttbench.REPO / "flowerpower_daemon", mqttbench.PROJECT):
        compileall.compile_dir(tree, quiet=1)
    async with inbox(port, "spawn") as box:
        for name in ("census", *(f"spawn{i}" for i in range(args.spawn_runs))):
            await box.listen(f"bench/{name}/status")
        cfg = daemon_config(tmp, "census", port, [MQTT_TRIGGER])
        census_cmd = [sys.executable, str(tmp / "census.py"), str(census), "run", "-c", str(cfg)]
        await spawn_daemon(box, "census", census_cmd)  # untimed: also warms the disk cache
        modules.write_text("\n".join(floor_modules(census)) + "\n")
        for i in range(args.spawn_runs if "spawn" not in args.skip else 0):
            cfg = daemon_config(tmp, f"spawn{i}", port, [MQTT_TRIGGER])
            cmd = [str(daemon_bin), "run", "-c", str(cfg)]
            if i % 2 == 0:
                daemon_s.append(await spawn_daemon(box, f"spawn{i}", cmd))
                floor_s.append(await spawn_floor(i))
            else:
                floor_s.append(await spawn_floor(i))
                daemon_s.append(await spawn_daemon(box, f"spawn{i}", cmd))
    if not daemon_s:
        return modules, None
    n_mod, n_failed = imported[0].split()[1:3]
    row = ratio_row(
        "spawn_to_ready",
        "spawn -> READY (retained online)",
        "s",
        statistics.median(daemon_s),
        statistics.median(floor_s),
        f"python importing the same {n_mod} modules ({n_failed} failed), spawn -> 'ready' (median)",
        1.5,
        ratio=statistics.median([d / f for d, f in zip(daemon_s, floor_s, strict=True)]),
        runs_s=daemon_s,
        floor_runs_s=floor_s,
    )
    row.detail["ratio_is"] = "median of the per-pair ratios"
    return modules, row


def floor_modules(census: Path) -> list[str]:
    """The daemon's loaded modules, in load order, without its own and the project's."""
    skip_files = (str(mqttbench.REPO / "flowerpower_daemon"), str(mqttbench.PROJECT))
    names = []
    for entry in census.read_text().splitlines():
        name, _, file = entry.partition("\t")
        if name.startswith(("flowerpower_daemon", "__main__", "__mp_main__")):
            continue
        if file and file.startswith(skip_files):
            continue
        names.append(name)
    return names


async def idle_phase(daemon_pid: int, modules: Path, tmp: Path, args: Any) -> list[Row]:
    """The warm main daemon and an import-floor process, both left alone ``--idle-seconds``."""
    log = tmp / "idle-floor.log"
    async with child([sys.executable, str(tmp / "import_floor.py"), str(modules)], log) as floor:
        await line(floor, args.start_timeout, "import floor", log)
        d, f = psutil.Process(daemon_pid), psutil.Process(floor.pid)
        print(f"[bench] idle: {args.idle_seconds:g} s ...", file=sys.stderr, flush=True)
        c0, t0 = (cpu(d), cpu(f)), time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        c1, wall = (cpu(d), cpu(f)), time.monotonic() - t0
        rss = d.memory_info().rss / 2**20, f.memory_info().rss / 2**20
    rows = []
    if args.idle_seconds > 0:
        busy = [(b - a) / wall * 100.0 for a, b in zip(c0, c1, strict=True)]
        rows.append(
            Row(
                "idle_cpu_30s",
                f"idle CPU over {args.idle_seconds:g} s",
                "%",
                busy[0],
                busy[1],
                "python importing the same libraries, idle as long",
                None,
                "<= 0.5 %",
                busy[0] <= 0.5,
                {"seconds": wall},
            )
        )
    rows.append(
        ratio_row(
            "rss_after_warmup",
            "RSS after warm-up",
            "MiB",
            rss[0],
            rss[1],
            "python importing the same libraries",
            1.3,
        )
    )
    return rows


async def timer_phase(port: int, tmp: Path, args: Any, daemon_bin: Path) -> Row:
    """Interval (and cron) run-start lateness against an anyio sleep-until loop, side by side."""
    skip = 5  # first fires: the daemon (and the floor) are still settling
    n = args.timer_fires + skip
    triggers = [
        {
            "name": "tick",
            "type": "interval",
            "pipeline": "temperature",
            "every": args.timer_every,
            "inputs": {"temperature": 21.5},
            "result_topic": "bench/timer/interval",
        },
        {
            "name": "cron",
            "type": "cron",
            "pipeline": "temperature",
            "cron": "* * * * * *",
            "inputs": {"temperature": 21.5},
            "result_topic": "bench/timer/cron",
        },
    ]
    cfg = daemon_config(tmp, "timer", port, triggers)
    (tmp / "sleep_floor.py").write_text(SLEEP_FLOOR_SCRIPT)
    late: dict[str, list[float]] = {"interval": [], "cron": [], "queued": []}
    async with inbox(port, "timer") as box:
        for topic in ("bench/timer/status", "bench/timer/interval", "bench/timer/cron"):
            await box.listen(topic)
        with daemon([str(daemon_bin), "run", "-c", str(cfg)], "timer", tmp) as proc:
            log = tmp / "timer.log"
            await box.online("timer", proc, log, args.start_timeout)
            print(
                f"[bench] timers: {n} fires every {args.timer_every:g} s ...",
                file=sys.stderr,
                flush=True,
            )
            flog = tmp / "sleep-floor.log"
            async with child(
                [sys.executable, str(tmp / "sleep_floor.py"), str(args.timer_every), str(n)], flog
            ) as sleeper:
                for _ in range(n):
                    _, r = await box.get("bench/timer/interval", 30, proc, log)
                    if r.get("status") != "success":
                        raise RuntimeError(f"timer run failed: {r}")
                    scheduled = iso(r["trigger"]["scheduled"])
                    late["interval"].append((iso(r["started_at"]) - scheduled) * 1000.0)
                    late["queued"].append((iso(r["queued_at"]) - scheduled) * 1000.0)
                floor_ms = json.loads(await line(sleeper, 30, "sleep floor", flog))[skip:]
            while not box.queues["bench/timer/cron"].empty():
                _, r = box.queues["bench/timer/cron"].get_nowait()
                late["cron"].append((iso(r["started_at"]) - iso(r["trigger"]["scheduled"])) * 1e3)
    ours = late["interval"][skip:]
    value, floor = pct(ours, 99), pct(floor_ms, 99)
    row = Row(
        "timer_fire_lateness_p99",
        "cron/interval fire lateness p99",
        "ms",
        value,
        floor,
        f"anyio sleep-until loop, same grid, same time (p99 of {len(floor_ms)} wakes)",
        value / floor if floor else None,
        "<= floor + 2 ms",
        value <= floor + 2.0,
        {
            "excess_ms": value - floor,
            "fires": len(ours),
            "every_s": args.timer_every,
            "p50": pct(ours, 50),
            "floor_p50": pct(floor_ms, 50),
            "max": max(ours),
            "floor_max": max(floor_ms),
            "queued_p50": pct(late["queued"][skip:], 50),
            "queued_p99": pct(late["queued"][skip:], 99),
            "cron_fires": len(late["cron"]),
            "cron_max": max(late["cron"], default=None),
            "measured": "result started_at - trigger.scheduled (run start)",
        },
    )
    return row


async def file_phase(port: int, tmp: Path, args: Any, daemon_bin: Path) -> Row:
    """New file -> run start (ours) against ``awatch`` alone yielding it (floor), side by side."""
    watch = tmp / "watch"
    watch.mkdir()
    trig = {
        "name": "files",
        "type": "file",
        "pipeline": "temperature",
        "path": str(watch),
        "patterns": ["*.txt"],
        "inputs": {"temperature": 21.5},
        "result_topic": "bench/file/results",
    }
    cfg = daemon_config(tmp, "file", port, [trig])
    (tmp / "awatch_floor.py").write_text(AWATCH_FLOOR_SCRIPT)
    ours: list[float] = []
    floor_ms: list[float] = []
    rng = random.Random(13)
    async with inbox(port, "file") as box:
        for topic in ("bench/file/status", "bench/file/results"):
            await box.listen(topic)
        with daemon([str(daemon_bin), "run", "-c", str(cfg)], "file", tmp) as proc:
            log, flog = tmp / "file.log", tmp / "awatch-floor.log"
            # the daemon's debounce (0.2 s) and step (min(50, debounce)) for awatch
            async with child(
                [sys.executable, str(tmp / "awatch_floor.py"), str(watch), "200", "50"], flog
            ) as floor:
                await line(floor, args.start_timeout, "awatch floor", flog)
                await box.online("file", proc, log, args.start_timeout)
                await asyncio.sleep(0.5)  # the floor's watcher is installed on its first step
                print(
                    f"[bench] files: {args.file_events} new files ...", file=sys.stderr, flush=True
                )
                warmup = 3
                for i in range(warmup + args.file_events):
                    await asyncio.sleep(rng.uniform(0.05, 0.15))
                    path = watch / f"f{i}.txt"
                    t0 = time.time()
                    path.write_text("21.5\n")
                    _, r = await box.get("bench/file/results", 10, proc, log)
                    if r["trigger"].get("file_path") != str(path) or r["status"] != "success":
                        raise RuntimeError(f"unexpected file run: {r}")
                    # a write that spans two batches shows an earlier file again: skip it
                    floor_path, earlier = "", {str(watch / f"f{k}.txt") for k in range(i)}
                    while floor_path != str(path):
                        seen = await line(floor, 10, "awatch floor", flog)
                        t_floor, _, floor_path = seen.partition(" ")
                        if floor_path != str(path) and floor_path not in earlier:
                            raise RuntimeError(f"awatch floor saw {floor_path}, not {path}")
                    if i >= warmup:
                        ours.append((iso(r["started_at"]) - t0) * 1000.0)
                        floor_ms.append((float(t_floor) - t0) * 1000.0)
    return ratio_row(
        "file_event_to_run_start_p50",
        "file event -> run start p50",
        "ms",
        pct(ours, 50),
        pct(floor_ms, 50),
        "watchfiles awatch alone (debounce 200, step 50), same files, same time",
        1.5,
        events=len(ours),
        p99=pct(ours, 99),
        floor_p99=pct(floor_ms, 99),
    )


def echo_rows(res: dict[str, Any]) -> list[Row]:
    """The three rows the echo comparison gives (``e2e.measure``'s result)."""
    e, d = res["echo"], res["daemon"]
    return [
        ratio_row(
            "p50_publish_to_result_memory_queue",
            "p50 publish -> result, memory queue",
            "ms",
            d["p50"],
            e["p50"],
            "bare aiomqtt echo (QoS 1 in and out)",
            1.25,
            p99=d["p99"],
            floor_p99=e["p99"],
        ),
        ratio_row(
            "throughput_memory_queue",
            "throughput, memory queue",
            "msg/s",
            d["tput"],
            e["tput"],
            "bare aiomqtt echo",
            0.75,
            higher_is_better=True,
            ratio=statistics.median(res["tput_ratios"]),
            rounds=d["tputs"],
            floor_rounds=e["tputs"],
            round_ratios=res["tput_ratios"],
        ),
        ratio_row(
            "daemon_cpu_per_message",
            "daemon CPU per message",
            "ms",
            d["cpu_ms"],
            e["cpu_ms"],
            "bare aiomqtt echo's CPU per message",
            1.5,
            broker_ms=d["broker_cpu_ms"],
            floor_broker_ms=e["broker_cpu_ms"],
        ),
    ]


ORDER = (  # the order
    "p50_publish_to_result_memory_queue",
    "throughput_memory_queue",
    "daemon_cpu_per_message",
    "timer_fire_lateness_p99",
    "file_event_to_run_start_p50",
    "idle_cpu_30s",
    "rss_after_warmup",
    "spawn_to_ready",
)
ROW_GROUPS = ("echo", "spawn", "idle", "timer", "file")
SKIP_HELP = (
    "comma-separated row groups to skip: echo (p50, throughput, CPU per message), "
    "spawn, idle (idle CPU and RSS), timer, file"
)


def parse_skip(text: str, error: Callable[[str], Any]) -> set[str]:
    groups = {g.strip() for g in text.split(",") if g.strip()}
    unknown = groups - set(ROW_GROUPS)
    if unknown:
        error(f"--skip: unknown row group(s) {sorted(unknown)}; use {', '.join(ROW_GROUPS)}")
    return groups
