"""Fleet benchmark: the daemon with Redis workers and on a shared subscription, against floors.

Run from the repository root::

    .venv/bin/python bench/fleet.py                     # --m 5000 messages, --rounds 5
    .venv/bin/python bench/fleet.py --json /tmp/fleet.json

One run starts its own Mosquitto (``e2e.py``'s config) and redis-server (no
persistence: ``save ""``, ``appendonly no``) on free loopback ports, then every
process of every setup below, all at once (an idle one costs the others next
to nothing), and measures them from this one client process, setup after
setup, in ``--rounds`` rounds (the order reverses every other round: the
machine's speed drifts by tens of percent within a minute, and a ratio of two
setups measured side by side holds still):

Redis mode, each beside its floor, each on a Redis stream of its own:

- ``redis_1``: ``flowerpower-daemon run`` with ``queue.broker`` on Redis and
  one ``flowerpower-daemon worker``: messages in via MQTT to the daemon
  (``r1/b<seq>/temperature``), enqueued to the stream, run by the worker
  (pipeline ``temperature`` of ``examples/sensors``), results out via MQTT
  (``r1/results``); ``redis_3``: the same with three workers;
- ``floor_1`` / ``floor_3``: bare taskiq-redis, the floor any taskiq Redis
  stream service pays here: this process ``kiq``s each message to a bare
  ``RedisStreamBroker`` (defaults: JSON serializer, no result backend), one
  ``taskiq worker --workers 1`` (or ``--workers 3``: three worker processes)
  runs a trivial async task that ``PUBLISH``es the sequence number on a Redis
  channel this process subscribes to (one Redis command per result: the
  cheapest honest way to see it). ``taskiq worker --max-async-tasks`` is the
  daemon's ``queue.worker_concurrency`` (``--concurrency``, default 4, the
  daemon's default), so both sides run as many tasks at once per worker.

Shared-subscription mode (memory queue):

- ``solo``: one ``flowerpower-daemon run`` on ``solo/{device}/temperature``;
- ``shared_2``: two daemons with the same trigger on ``sh/{device}/temperature``
  and ``shared_group: fleet`` (``$share/fleet/...``): each message goes to one.

Each measurement sends ``--m`` messages (QoS 1 for MQTT) with at most
``--window`` outstanding, timed until the last reply (``e2e.Client.throughput``:
every wait bounded), and records the CPU time of every process of the setup
(daemon(s), workers (with their child processes), Mosquitto, Redis, this
client) and, for the Redis setups, Redis's ``INFO commandstats`` before and
after (commands per message), its memory growth, and at the end the size of
each stream and of the keys a run leaves; it counts the results per
``worker`` (who ran them). Throughput is the median of the rounds; a ratio
is the median of the per-round ratios (ours / floor; ``shared_2`` / ``solo``).
``--json FILE`` writes every figure, floor and ratio as one object;
``--redis-monitor FILE`` records ``redis-cli MONITOR``; ``--profile DIR``
runs ``redis_1``'s daemon and worker under cProfile.
Every child is stopped (SIGTERM, then SIGKILL) on exit, error, Ctrl-C or
SIGTERM. Reuses ``e2e.py``'s broker config, client and process handling and
``ab.py``'s probe-and-warm-up.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab
import e2e
import table

HOST = e2e.HOST
STATUS = "fleet/status/{client_id}"
SHARED_GROUP = "fleet"
DAEMONS = ["r1", "r3", "solo", "sh-a", "sh-b"]  # process names of the daemons

# The floor's task module, imported by ``taskiq worker floor_tasks:broker``.
FLOOR_TASKS = textwrap.dedent(
    """\
    import os
    from redis.asyncio import Redis
    from taskiq_redis import RedisStreamBroker

    URL, QUEUE = os.environ["FLEET_FLOOR_REDIS"], os.environ["FLEET_FLOOR_QUEUE"]
    broker = RedisStreamBroker(URL, queue_name=QUEUE, consumer_group_name=QUEUE + "-workers")
    _redis = []

    @broker.task(task_name="floor.echo")
    async def echo(seq: int) -> None:
        if not _redis:
            _redis.append(Redis.from_url(URL))
        await _redis[0].publish(QUEUE + ":results", seq)
    """
)


# --------------------------------------------------------------- the floor side


class KiqPublisher:
    """Duck-types ``aiomqtt.Client.publish`` for ``e2e.Client``: the "topic" names a queue."""

    def __init__(self) -> None:
        self.kickers: dict[str, Any] = {}
        self.brokers: list[Any] = []

    async def add(self, url: str, queue: str) -> None:
        from taskiq.kicker import AsyncKicker
        from taskiq_redis import RedisStreamBroker

        broker = RedisStreamBroker(url, queue_name=queue, consumer_group_name=queue + "-workers")
        await broker.startup()  # creates the stream and the group before any worker reads
        self.brokers.append(broker)
        self.kickers[queue] = AsyncKicker("floor.echo", broker, {})

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        await self.kickers[topic].kiq(int(payload))

    async def close(self) -> None:
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                await broker.shutdown()


def floor_target(queue: str) -> e2e.Target:
    def request(seq: int) -> tuple[str, bytes]:
        return queue, b"%d" % seq

    def reply_seq(payload: bytes) -> tuple[int, dict[str, Any] | None]:
        return int(payload), None

    return e2e.Target(queue, queue + ":results", request, reply_seq)


async def floor_reader(client: e2e.Client, pubsub: Any) -> None:
    """``e2e.Client.reader`` for replies on Redis channels."""
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        now = time.perf_counter()
        target = client.target
        channel = message["channel"].decode()
        if target is None or channel != target.out_topic:
            continue
        seq, _ = target.reply_seq(message["data"])
        fut = client.waiting.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_result((now, None))


def daemon_target(name: str, seen: dict[str, int]) -> e2e.Target:
    """``ab.target``, also counting the results per ``worker`` (who ran the run)."""
    def reply_seq(payload: bytes) -> tuple[int, dict[str, Any] | None]:
        data = orjson.loads(payload)
        if data.get("status") != "success":
            raise RuntimeError(f"{name}: run did not succeed: {payload[:300]!r}")
        who = str(data.get("worker"))
        seen[who] = seen.get(who, 0) + 1
        return int(data["outputs"]["device_id"][1:]), None

    base = ab.target(name)
    return e2e.Target(base.name, base.out_topic, base.request, reply_seq)


# -------------------------------------------------------------------- setups


@dataclass
class Setup:
    name: str
    target: e2e.Target
    floor: bool  # bare taskiq (Redis channel replies) rather than MQTT
    roles: dict[str, list[int]]  # role -> pids (their child processes count too)
    redis_ops: bool
    tputs: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds, all rounds
    ops: dict[str, int] = field(default_factory=dict)  # Redis command -> calls, all rounds
    mem: int = 0  # Redis used_memory growth over its runs (bytes)
    stream: tuple[int, int] = (0, 0)  # entries in its stream, MEMORY USAGE of it, at the end
    key_bytes: dict[str, float] = field(default_factory=dict)  # kind of key -> mean MEMORY USAGE
    seen: dict[str, int] = field(default_factory=dict)  # result's "worker" -> results
    keys: int = 0  # Redis keys added over its runs


def tree_cpu(pids: list[int], children: bool) -> float:
    """CPU seconds of ``pids`` (and, with ``children``, of their child processes)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)] if children else [proc]
        except psutil.Error:
            continue
        total += sum(e2e.cpu_seconds(p) for p in procs)
    return total


def daemon_config(
    tmp: Path, name: str, port: int, *, topic: str, redis_url: str | None = None,
    concurrency: int = 4, shared: bool = False, results: str | None = None,
) -> Path:
    state = tmp / f"state-{name}"
    state.mkdir()
    queue = (
        f"queue: {{broker: '{redis_url}', queue_name: fleet-{name}, "
        f"consumer_group: fleet-{name}-workers, worker_concurrency: {concurrency}}}\n"
        if redis_url else ""
    )
    path = tmp / f"{name}.yml"
    path.write_text(
        f"project: {json.dumps(str(e2e.PROJECT))}\n"
        f"state_dir: {json.dumps(str(state))}\n"
        f"mqtt: {{url: 'mqtt://{HOST}:{port}', client_id: fleet-{name}, "
        f"result_topic: '{results or topic}/results', status_topic: '{STATUS}'}}\n"
        "log_level: WARNING\n"
        + queue
        + "triggers:\n"
        f"  - {{name: temp, type: mqtt, pipeline: temperature, "
        f"topic: '{topic}/{{device}}/temperature', qos: 1"
        + (f", shared_group: {SHARED_GROUP}" if shared else "")
        + "}\n"
    )
    return path


async def wait_online(mqtt: aiomqtt.Client, names: list[str], procs: dict[str, Any],
                      tmp: Path, limit: float) -> None:
    """Every daemon's retained ``online`` status (bounded; fail if one exits)."""
    await mqtt.subscribe(STATUS.format(client_id="+"), qos=1)
    want = {f"fleet-{n}" for n in names}
    online: set[str] = set()

    async def collect() -> None:
        async for message in mqtt.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            with contextlib.suppress(ValueError):
                data = json.loads(payload)
                if data.get("status") == "online":
                    online.add(message.topic.value.rsplit("/", 1)[-1])
            if want <= online:
                return

    task = asyncio.ensure_future(collect())
    deadline = time.monotonic() + limit
    try:
        while not task.done():
            for n in names:
                if procs[n].poll() is not None:
                    raise RuntimeError(f"{n} exited with {procs[n].returncode}:\n"
                                       f"{e2e.tail(tmp / f'{n}.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not online after {limit} s: {sorted(want - online)}")
            await asyncio.wait([task], timeout=0.1)
        task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await mqtt.unsubscribe(STATUS.format(client_id="+"))


async def wait_workers(count: Callable[[], Awaitable[int]], n: int, what: str,
                       procs: list[Any], limit: float) -> None:
    """Until ``count()`` says ``n`` workers consume (bounded; fail if one exits)."""
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(Exception):
            if await count() >= n:
                return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a worker of {what} exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: fewer than {n} workers consuming after {limit} s")
        await asyncio.sleep(0.1)


async def commandstats(redis: Redis) -> dict[str, int]:
    info = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def memory(redis: Redis) -> tuple[int, int]:
    """Redis's ``used_memory`` (bytes) and key count."""
    info = await redis.info("memory")
    return int(info["used_memory"]), int(await redis.dbsize())


async def key_usage(redis: Redis, pattern: str, n: int = 50) -> float:
    """Mean ``MEMORY USAGE`` of up to ``n`` keys matching ``pattern`` (0 if none)."""
    sizes = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        sizes.append(int(await redis.memory_usage(key, samples=0) or 0))
        if len(sizes) >= n:
            break
    return statistics.fmean(sizes) if sizes else 0.0


# ------------------------------------------------------------------- measure


async def measure(args: argparse.Namespace, ports: dict[str, int], procs: dict[str, Any],
                  tmp: Path, redis_url: str, setups: list[Setup]) -> None:
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 65535
    redis = Redis.from_url(redis_url)
    pubsub = redis.pubsub()
    kiq = KiqPublisher()
    async with aiomqtt.Client(
        HOST, ports["mqtt"], identifier=f"fleet-client-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5, socket_options=e2e.NODELAY,
        max_inflight_messages=max(20, args.window), properties=props, timeout=30,
        logger=logging.getLogger("bench.quiet"),
    ) as mqtt:
        logging.getLogger("bench.quiet").setLevel(logging.ERROR)
        await wait_online(mqtt, DAEMONS, procs, tmp, args.start_timeout)
        for s in setups:
            if not s.floor:
                await mqtt.subscribe(s.target.out_topic, qos=1)
        mq = e2e.Client(mqtt)
        fl = e2e.Client(kiq)  # type: ignore[arg-type]  # duck-typed publish
        for s in setups:
            if s.floor:
                await kiq.add(redis_url, s.target.name)
                await pubsub.subscribe(s.target.out_topic)
        readers = [asyncio.ensure_future(mq.reader()),
                   asyncio.ensure_future(floor_reader(fl, pubsub))]
        try:
            seq = 0
            # Ready: every worker consuming (Redis), then probes until a reply and warm-up.
            for s in setups:
                workers = [procs[n] for n in procs if n.startswith(s.name + "-w")]
                if s.redis_ops:
                    # bare taskiq: its log line per worker process (XREADGROUP creates no
                    # consumer until it reads); ours: the live-worker index in Redis
                    n = int(s.name.rsplit("_", 1)[-1])
                    log = tmp / f"{s.name}-w.log"

                    async def taskiq_ready(log: Path = log) -> int:
                        text = await asyncio.to_thread(log.read_bytes)
                        return text.count(b"Listening started.")

                    key = f"{{fleet-{s.name.replace('redis_', 'r')}}}:workers"

                    async def ours_ready(key: str = key) -> int:
                        return int(await redis.zcard(key))

                    await wait_workers(taskiq_ready if s.floor else ours_ready, n, s.name,
                                       workers, args.start_timeout)
                print(f"[fleet] {s.name}: ready, warm-up ...", file=sys.stderr, flush=True)
                if s.floor:
                    await fl.latency(s.target, args.warmup, seq)
                else:
                    short = s.target.name
                    proc = procs.get(short) or procs[short + "-a"]
                    seq = await ab.ready(mq, short, proc, tmp / f"{short}.log", seq)
                seq += args.warmup
            mosquitto, redis_pid, me = procs["mosquitto"].pid, procs["redis"].pid, os.getpid()
            for r in range(args.rounds):
                for s in setups if r % 2 == 0 else setups[::-1]:
                    print(f"[fleet] round {r + 1}/{args.rounds}: {s.name}, {args.m} messages",
                          file=sys.stderr, flush=True)
                    roles = dict(s.roles, mosquitto=[mosquitto], redis=[redis_pid], client=[me])
                    cpu0 = {role: tree_cpu(pids, role == "workers") for role, pids in roles.items()}
                    ops0 = await commandstats(redis) if s.redis_ops else {}
                    mem0 = await memory(redis) if s.redis_ops else (0, 0)
                    client = fl if s.floor else mq
                    s.tputs.append(await client.throughput(s.target, args.m, seq, args.window))
                    seq += args.m
                    if s.redis_ops:
                        mem1 = await memory(redis)
                        s.mem += mem1[0] - mem0[0]
                        s.keys += mem1[1] - mem0[1]
                        ops1 = await commandstats(redis)
                        for cmd, calls in ops1.items():
                            s.ops[cmd] = s.ops.get(cmd, 0) + calls - ops0.get(cmd, 0)
                    for role, pids in roles.items():
                        s.cpu[role] = (s.cpu.get(role, 0.0) + tree_cpu(pids, role == "workers")
                                       - cpu0[role])
                    for name, p in procs.items():
                        if p.poll() is not None:
                            raise RuntimeError(f"{name} exited during the run ({p.returncode}):"
                                               f"\n{e2e.tail(tmp / f'{name}.log')}")
            for s in setups:
                if s.redis_ops:
                    queue = s.target.name if s.floor else f"fleet-{s.name.replace('redis_', 'r')}"
                    usage = await redis.memory_usage(queue, samples=0)
                    s.stream = (int(await redis.xlen(queue)), int(usage or 0))
                    if not s.floor:  # the keys each run leaves behind, and their TTLs
                        for kind, pattern in (("history job", f"{queue}:history:job:*"),
                                              ("taskiq result", "?" * 32)):
                            s.key_bytes[kind] = await key_usage(redis, pattern)
        finally:
            for task in readers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError, Exception):
                    await task
            await kiq.close()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await redis.aclose()
        for c in (mq, fl):
            if c.errors:
                print(f"[fleet] {len(c.errors)} bad replies, e.g. {c.errors[:3]}",
                      file=sys.stderr)


# -------------------------------------------------------------------- report

ROWS: tuple[tuple[str, str, str, str, float | None], ...] = (
    # JSON key (after issue 13's row), label, ours, floor, goal (ratio >=; None: report)
    ("throughput_redis_1_worker", "throughput through Redis, 1 daemon + 1 worker",
     "redis_1", "floor_1", 0.7),
    ("throughput_redis_3_workers", "throughput through Redis, 1 daemon + 3 workers",
     "redis_3", "floor_3", 0.7),
    ("throughput_shared_2_daemons", "2 daemons on a shared subscription (memory queue)",
     "shared_2", "solo", None),
)
FLOOR_NAMES = {"floor_1": "bare taskiq-redis, 1 worker", "floor_3": "bare taskiq-redis, "
               "3 workers", "solo": "1 daemon"}


def report(setups: list[Setup], args: argparse.Namespace, load: tuple[float, ...],
           versions: dict[str, str]) -> dict[str, Any]:
    by = {s.name: s for s in setups}
    msgs = args.rounds * args.m
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"host": socket.gethostname(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), **versions},
        "load_average_before": load, "load_average_after": os.getloadavg(),
        "args": {"m": args.m, "rounds": args.rounds, "window": args.window,
                 "concurrency": args.concurrency},
    }
    rows = []
    for key, label, ours, floor, goal in ROWS:
        o, f = by[ours], by[floor]
        ratios = [a / b for a, b in zip(o.tputs, f.tputs, strict=True)]
        value, fv = statistics.median(o.tputs), statistics.median(f.tputs)
        detail = {"rounds": o.tputs, "floor_rounds": f.tputs, "round_ratios": ratios}
        if goal is None:  # no goal: reported beside its floor
            detail.update(ratio_is="median of the per-round ratios", ratio_of_medians=value / fv)
            rows.append(table.Row(key, label, "msg/s", value, fv, FLOOR_NAMES[floor],
                                  statistics.median(ratios), "report", None, detail))
        else:
            rows.append(table.ratio_row(key, label, "msg/s", value, fv, FLOOR_NAMES[floor], goal,
                                        higher_is_better=True, ratio=statistics.median(ratios),
                                        **detail))
    table.print_table(rows)
    for row in rows:
        out[row.key] = row.to_json()
    print(f"msg/s: median of {args.rounds} rounds of {args.m} messages (window {args.window}); "
          "ratio: median of the per-round ratios")
    print()
    roles = ("daemon", "workers", "mosquitto", "redis", "client")
    print("CPU ms per message (all rounds; workers include their child processes):")
    print(f"  {'setup':<10}{'msg/s':>8}" + "".join(f"{r:>11}" for r in roles)
          + f"{'service':>11}")
    out["cpu_ms_per_msg"] = {}
    for s in setups:
        cpu = {r: s.cpu[r] * 1000.0 / msgs for r in s.cpu}
        out["cpu_ms_per_msg"][s.name] = cpu
        out.setdefault("throughput", {})[s.name] = statistics.median(s.tputs)
        cpu["service"] = sum(v for r, v in cpu.items() if r != "client")
        print(f"  {s.name:<10}{statistics.median(s.tputs):>8.0f}" + "".join(
            f"{cpu[r]:>11.3f}" if r in cpu else f"{'-':>11}" for r in (*roles, "service")))
    print("  service = everything but this client (daemon + workers + Mosquitto + Redis)")
    print()
    print("who ran the runs (the results' \"worker\", timed rounds):")
    out["runs_by"] = {}
    for s in setups:
        if not s.floor:
            out["runs_by"][s.name] = s.seen
            print(f"  {s.name:<10}" + ", ".join(f"{w} {n}" for w, n in sorted(s.seen.items())))
    print()
    print("Redis commands per message (INFO commandstats delta / messages):")
    out["redis_commands_per_msg"] = {}
    for s in setups:
        if not s.redis_ops:
            continue
        per = {c: n / msgs for c, n in sorted(s.ops.items(), key=lambda kv: -kv[1]) if n > 0}
        per.pop("info", None)  # the benchmark's own
        out["redis_commands_per_msg"][s.name] = per
        total = sum(per.values())
        print(f"  {s.name:<10} {total:5.2f}: " + ", ".join(f"{c} {n:.2f}" for c, n in per.items()))
    print()
    print("Redis memory kept per message (used_memory and key count growth over the runs: "
          "what stays after the run is done):")
    out["redis_retained_per_msg"] = {}
    for s in setups:
        if s.redis_ops:
            out["redis_retained_per_msg"][s.name] = {"bytes": s.mem / msgs, "keys": s.keys / msgs}
            n, size = s.stream
            out["redis_retained_per_msg"][s.name]["stream_entries"] = n
            out["redis_retained_per_msg"][s.name]["stream_bytes_per_entry"] = size / max(n, 1)
            print(f"  {s.name:<10} {s.mem / msgs:7.0f} bytes, {s.keys / msgs:5.2f} keys; "
                  f"its stream holds {n} entries (none trimmed), {size / max(n, 1):.0f} bytes "
                  "each (MEMORY USAGE)")
            if s.key_bytes:
                out["redis_retained_per_msg"][s.name]["key_bytes"] = s.key_bytes
                print(f"  {'':<10} keys per run: " + ", ".join(
                    f"{kind} {size:.0f} bytes" for kind, size in s.key_bytes.items()))
    return out


# ---------------------------------------------------------------------- main


def start(stack: contextlib.ExitStack, procs: dict[str, Any], name: str, cmd: list[str],
          tmp: Path, **kw: Any) -> None:
    procs[name] = stack.enter_context(e2e.spawned(cmd, name, tmp / f"{name}.log", **kw))


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    # A round of 3,000 (1.5 s) let one round's ratio swing from 0.55 to 0.87 on this VM;
    # five of 5,000 hold the median within a few per cent.
    parser.add_argument("--m", type=int, default=5000, help="messages per setup and round "
                        "(default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--window", type=int, default=100, help="outstanding (default 100)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up round trips (floor)")
    parser.add_argument("--concurrency", type=int, default=4, help="runs at once per worker: "
                        "queue.worker_concurrency and taskiq --max-async-tasks (default 4)")
    parser.add_argument("--start-timeout", type=float, default=e2e.START_TIMEOUT)
    parser.add_argument("--json", metavar="FILE", type=Path, default=None,
                        help="write every figure, floor and ratio as one JSON object")
    parser.add_argument("--redis-monitor", metavar="FILE", type=Path, default=None,
                        help="also write `redis-cli MONITOR` to FILE (every command and key; "
                        "slows Redis: for a short run naming the commands, not for figures)")
    parser.add_argument("--profile", metavar="DIR", type=Path, default=None,
                        help="run redis_1's daemon and worker under cProfile (e2e.py's way), "
                        "write DIR/daemon.prof and DIR/worker.prof, print their top functions "
                        "(profiling slows them: not for figures)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if min(args.m, args.rounds, args.window, args.concurrency) < 1 or args.warmup < 0:
        parser.error("--m, --rounds, --window, --concurrency must be >= 1, --warmup >= 0")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    binaries = {b: shutil.which(b, path=path) for b in ("mosquitto", "redis-server")}
    daemon = e2e.VENV_BIN / "flowerpower-daemon"
    taskiq = e2e.VENV_BIN / "taskiq"
    if None in binaries.values() or not daemon.exists() or not taskiq.exists():
        print(f"need mosquitto, redis-server, {daemon}, {taskiq}: {binaries}", file=sys.stderr)
        return 2
    versions = {}
    for b, flag in (("mosquitto", "-h"), ("redis-server", "--version")):
        with contextlib.suppress(Exception):
            text = subprocess.run([str(binaries[b]), flag], capture_output=True, text=True,
                                  timeout=10).stdout
            versions[b] = text.splitlines()[0] if text else ""

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, e2e._terminated)
    load = os.getloadavg()
    print(f"fleet benchmark: {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start; "
          f"--m {args.m} --rounds {args.rounds} --window {args.window} "
          f"--concurrency {args.concurrency}", flush=True)
    if load[0] > (os.cpu_count() or 1):
        print("busy machine: absolute figures are noisy, ratios hold up better", flush=True)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fp-fleet-"))
    ports = {"mqtt": e2e.free_port(), "redis": e2e.free_port()}
    redis_url = f"redis://{HOST}:{ports['redis']}/0"
    try:
        (tmp / "mosquitto.conf").write_text(
            e2e.MOSQUITTO_CONF.format(port=ports["mqtt"], host=HOST))
        (tmp / "floor_tasks.py").write_text(FLOOR_TASKS)
        procs: dict[str, Any] = {}
        setups: list[Setup] = []
        with contextlib.ExitStack() as stack:
            start(stack, procs, "mosquitto", [str(binaries["mosquitto"]), "-c",
                  str(tmp / "mosquitto.conf")], tmp)
            start(stack, procs, "redis", [str(binaries["redis-server"]), "--port",
                  str(ports["redis"]), "--bind", HOST, "--save", "", "--appendonly", "no",
                  "--dir", str(tmp)], tmp)
            for name in ("mosquitto", "redis"):
                e2e.wait_port(ports["mqtt" if name == "mosquitto" else "redis"], procs[name],
                              tmp / f"{name}.log", args.start_timeout)
            if args.redis_monitor is not None:
                cli = shutil.which("redis-cli", path=path) or "redis-cli"
                monitor = stack.enter_context(args.redis_monitor.open("wb"))
                start(stack, procs, "monitor", [cli, "-h", HOST, "-p", str(ports["redis"]),
                      "monitor"], tmp, stdout=monitor)

            def spawn(name: str, cmd: list[str], **kw: Any) -> int:
                start(stack, procs, name, cmd, tmp, cwd=tmp, **kw)
                return int(procs[name].pid)

            def run(cfg: Path, profile: str | None = None) -> list[str]:
                return [*cli(profile), "run", "-c", str(cfg)]

            def worker(cfg: Path, profile: str | None = None) -> list[str]:
                return [*cli(profile), "worker", "-c", str(cfg)]

            def cli(profile: str | None) -> list[str]:
                if profile is None or args.profile is None:
                    return [str(daemon)]
                (tmp / "profile_daemon.py").write_text(e2e.PROFILE_SCRIPT)
                out = args.profile.resolve() / f"{profile}.prof"
                return [sys.executable, str(tmp / "profile_daemon.py"), str(out)]

            for n in (1, 3):
                # floor: bare taskiq worker(s) (the client's broker creates the group first,
                # in measure(); a worker started before it creates it the same way)
                queue = f"floor{n}"
                env = dict(os.environ, FLEET_FLOOR_REDIS=redis_url, FLEET_FLOOR_QUEUE=queue)
                pid = spawn(f"floor_{n}-w", [str(taskiq), "worker", "floor_tasks:broker",
                            "--app-dir", str(tmp), "--workers", str(n), "--max-async-tasks",
                            str(args.concurrency), "--log-level", "INFO"], env=env,
                            start_new_session=True)
                # taskiq 0.13's `taskiq worker` parent does not exit on SIGTERM or SIGINT
                # (its children stop, it hangs): kill its process group, which holds nothing
                stack.callback(kill_group, pid)
                setups.append(Setup(f"floor_{n}", floor_target(queue), True,
                                    {"workers": [pid]}, True))
                # ours: one daemon, n workers
                cfg = daemon_config(tmp, f"r{n}", ports["mqtt"], topic=f"r{n}",
                                    redis_url=redis_url, concurrency=args.concurrency)
                d = spawn(f"r{n}", run(cfg, "daemon" if n == 1 else None))
                ws = [spawn(f"redis_{n}-w{i}", worker(cfg, "worker" if n == 1 else None))
                      for i in range(n)]
                setups.append(Setup(f"redis_{n}", ab.target(f"r{n}"), False,
                                    {"daemon": [d], "workers": ws}, True))
                setups[-1].target = daemon_target(f"r{n}", setups[-1].seen)
            cfg = daemon_config(tmp, "solo", ports["mqtt"], topic="solo")
            setups.append(Setup("solo", ab.target("solo"), False,
                                {"daemon": [spawn("solo", run(cfg))]}, False))
            setups[-1].target = daemon_target("solo", setups[-1].seen)
            pids = []
            for x in ("a", "b"):
                cfg = daemon_config(tmp, f"sh-{x}", ports["mqtt"], topic="sh", shared=True)
                pids.append(spawn(f"sh-{x}", run(cfg)))
            setups.append(Setup("shared_2", ab.target("sh"), False, {"daemon": pids}, False))
            setups[-1].target = daemon_target("sh", setups[-1].seen)
            # ab.ready() reads <name>.log of the probed daemon
            with contextlib.suppress(OSError):
                (tmp / "sh.log").symlink_to(tmp / "sh-a.log")
            try:
                asyncio.run(measure(args, ports, procs, tmp, redis_url, setups))
            except (TimeoutError, RuntimeError, aiomqtt.MqttError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            for name in ("r1", "redis_1-w0"):  # SIGTERM: a profiled process writes its stats
                e2e.stop_process(procs[name], name)
        out = report(setups, args, load, versions)
        out["elapsed_s"] = round(time.monotonic() - t_start, 1)
        print(f"\nelapsed {out['elapsed_s']:.0f} s; load average at the end "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        if args.profile is not None:
            for name in ("daemon", "worker"):
                path = args.profile.resolve() / f"{name}.prof"
                if path.exists():
                    print(f"\nredis_1 {name}:", end="")
                    e2e.print_profile(path, 25)
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        return 0
    finally:
        if args.keep:
            print(f"[fleet] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

