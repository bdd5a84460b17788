"""One Redis worker's cost per run: CPU, Redis commands, round trips, or instructions.

Run from the repository root::

    .venv/bin/python bench/worker.py .                         # this checkout, 3 rounds of 2,000
    .venv/bin/python bench/worker.py /tmp/fp-base              # another build (a directory
                                                               # holding flowerpower_daemon/)
    .venv/bin/python bench/worker.py . --round-trips           # also the worker's round trips
    .venv/bin/python bench/worker.py . --n 300 --callgrind /tmp/cg.out   # instructions per run
    .venv/bin/python bench/worker.py . --n 3000 --rounds 1 --profile /tmp/w.prof  # cProfile

Starts its own Mosquitto (``e2e.py``'s config) and redis-server (no
persistence), and one ``flowerpower-daemon worker`` of the example project
with the queue on Redis (``fleet.py``'s config: pipeline ``temperature``,
results on MQTT) and the build's directory first on its ``PYTHONPATH``. No
daemon: once the worker consumes, each round ``XADD``s ``--n`` run requests
at once, in the daemon's format, to the stream and waits (bounded) for their
``--n`` results on MQTT. It prints per round the worker's CPU ms per run
(``/proc`` times, all threads), runs/s, and the Redis commands per run
(``INFO commandstats`` deltas, named). A warm-up round (``--warm`` runs) is
not counted.

On a shared machine CPU times drift with the load; two figures do not:
``--callgrind FILE`` runs the worker under ``valgrind --tool=callgrind``
with instrumentation off until the measured round starts (one round, keep
``--n`` small: ~30 runs/s) and dumps the counts when it ends:
``callgrind_annotate FILE.1 | grep TOTALS`` divided by ``--n`` is the
instructions per run (idle work of the worker over the round included, a
few per cent at most). ``--rate R`` sends the measured runs at R per second instead of all at once:
what a run costs a worker that waits between runs (each of three workers
sharing a daemon's stream, say), with ``--callgrind`` too (R below ~30).
``--round-trips`` runs the worker at log level INFO
and prints its ``worker_runs_done`` line (its write batch's round trips and
writes, warm-up included); INFO costs CPU per run, so not with the CPU
figures. ``--profile FILE`` runs it under cProfile with a per-thread CPU
clock (``time.thread_time``: a waiting thread costs nothing), all threads
merged (``e2e.py``'s profile script).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e
import fleet

HOST = e2e.HOST
QUEUE = "fleet-w"  # fleet.daemon_config names the stream fleet-<name>


def request(seq: int) -> bytes:
    """One run request as the daemon ``XADD``s it (taskiq message, task id = run id)."""
    run_id = uuid.uuid4().hex
    args = {
        "pipeline": "temperature",
        "inputs": {"device": f"b{seq}", "temperature": 21.5},
        "overrides": {},
        "run_id": run_id,
        "trigger": {
            "name": "temp",
            "type": "mqtt",
            "topic": f"w/b{seq}/temperature",
            "fields": {"device": f"b{seq}"},
        },
        "queued_at": "2026-12-06T22:44:49.113210+00:00",
        "reply": {"publish": True, "topic": "w/results", "error_topic": "flowerpower/errors/t"},
        "dedup_key": None,
    }
    message = {
        "task_id": run_id,
        "task_name": "flowerpower.run_pipeline",
        "labels": {},
        "labels_types": {},
        "args": [args],
        "kwargs": {},
    }
    return orjson.dumps(message)


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


async def measure(
    args: argparse.Namespace, ports: dict[str, int], proc: subprocess.Popen[bytes], tmp: Path
) -> list[float]:
    """The rounds; CPU ms per run of each counted one."""
    redis = Redis.from_url(f"redis://{HOST}:{ports['redis']}/0")
    worker = psutil.Process(proc.pid)
    got, want, per_run = 0, 0, []

    def check(deadline: float, what: str) -> None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}; worker log:\n{e2e.tail(tmp / 'worker.log')}")

    async with aiomqtt.Client(HOST, ports["mqtt"], identifier=f"bench-worker-{os.getpid()}") as mq:
        await mq.subscribe("w/results", qos=1)
        deadline = time.monotonic() + args.start_timeout
        while int(await redis.zcard(f"{{{QUEUE}}}:workers")) < 1:
            check(deadline, "worker not consuming")
            await asyncio.sleep(0.1)

        async def reader() -> None:
            nonlocal got
            async for _ in mq.messages:
                got += 1

        task = asyncio.ensure_future(reader())
        try:
            for r in range(args.rounds + 1):  # round 0: warm-up
                n = args.warm if r == 0 else args.n
                bodies = [request(i) for i in range(n)]
                await asyncio.sleep(0.5)
                ops0 = await fleet.commandstats(redis)
                if args.callgrind and r == 1:
                    await asyncio.to_thread(callgrind_control, proc.pid, "-i", "on")
                cpu0, t0 = e2e.cpu_seconds(worker), time.perf_counter()
                want += n
                if args.rate is None or r == 0:  # all at once: the worker's capacity
                    async with redis.pipeline(transaction=False) as pipe:
                        for body in bodies:
                            pipe.xadd(QUEUE, {"data": body})
                        await pipe.execute()
                else:  # a trickle: what a run costs a worker that is not kept busy
                    start = time.monotonic()
                    for i, body in enumerate(bodies):
                        await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                        await redis.xadd(QUEUE, {"data": body})
                deadline = time.monotonic() + args.round_timeout
                while got < want:
                    check(deadline, f"{got} of {want} results")
                    await asyncio.sleep(0.01)
                t1, cpu1 = time.perf_counter(), e2e.cpu_seconds(worker)
                if args.callgrind and r == 1:
                    await asyncio.to_thread(callgrind_control, proc.pid, "-i", "off")
                    await asyncio.to_thread(callgrind_control, proc.pid, "-d")  # FILE.1
                await asyncio.sleep(0.3)
                ops1 = await fleet.commandstats(redis)
                if r == 0:
                    continue
                ops = {k: (v - ops0.get(k, 0)) / n for k, v in ops1.items() if v != ops0.get(k, 0)}
                ops.pop("info", None)
                per_run.append((cpu1 - cpu0) * 1000 / n)
                named = ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(ops.items(), key=lambda x: -x[1])
                )
                print(
                    f"round {r}: worker CPU {per_run[-1]:.3f} ms/run, {n / (t1 - t0):.0f} runs/s; "
                    f"Redis commands per run {sum(ops.values()):.2f}: {named}",
                    flush=True,
                )
        finally:
            task.cancel()
            await redis.aclose()
    return per_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a directory holding flowerpower_daemon/")
    parser.add_argument("--n", type=int, default=2000, help="runs per round")
    parser.add_argument("--warm", type=int, default=300, help="runs of the warm-up round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="XADD the measured rounds' runs at this many per second instead of all at "
        "once (a worker that is not kept busy, as each of several sharing a trickle)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="queue.worker_concurrency")
    parser.add_argument("--start-timeout", type=float, default=e2e.START_TIMEOUT)
    parser.add_argument("--round-timeout", type=float, default=600.0)
    parser.add_argument(
        "--round-trips",
        action="store_true",
        help="log level INFO: print the worker's round trips when it stops",
    )
    parser.add_argument("--profile", metavar="FILE", default=None, help="cProfile the worker")
    parser.add_argument(
        "--callgrind",
        metavar="FILE",
        default=None,
        help="count the measured round's instructions (one round)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.callgrind:
        args.rounds = 1
    binaries = {
        b: shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin")
        for b in ("mosquitto", "redis-server")
    }
    if None in binaries.values():
        print(f"need mosquitto and redis-server: {binaries}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(
        f"worker benchmark: {args.build}, {os.cpu_count()} CPUs, load average {load[0]:.2f} "
        f"at start; --n {args.n} --rounds {args.rounds}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="fp-worker-"))
    ports = {"mqtt": e2e.free_port(), "redis": e2e.free_port()}
    redis_url = f"redis://{HOST}:{ports['redis']}/0"
    (tmp / "mosquitto.conf").write_text(e2e.MOSQUITTO_CONF.format(port=ports["mqtt"], host=HOST))
    cfg = fleet.daemon_config(
        tmp, "w", ports["mqtt"], topic="w", redis_url=redis_url, concurrency=args.concurrency
    )
    if args.round_trips:
        cfg.write_text(cfg.read_text().replace("log_level: WARNING", "log_level: INFO"))
    env = dict(os.environ, PYTHONPATH=str(args.build.resolve()), HAMILTON_TELEMETRY_ENABLED="false")
    daemon = str(e2e.VENV_BIN / "flowerpower-daemon")
    command = [daemon, "worker", "-c", str(cfg)]
    if args.profile:
        (tmp / "profile_worker.py").write_text(e2e.PROFILE_SCRIPT)
        env["BENCH_PROFILE_CLOCK"] = "thread"
        command = [
            sys.executable,
            str(tmp / "profile_worker.py"),
            str(Path(args.profile).resolve()),
            "worker",
            "-c",
            str(cfg),
        ]
    if args.callgrind:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={Path(args.callgrind).resolve()}",
            sys.executable,
            *command,
        ]
    procs: list[tuple[str, subprocess.Popen[Any]]] = []
    try:
        for name, cmd in (
            ("mosquitto", [str(binaries["mosquitto"]), "-c", str(tmp / "mosquitto.conf")]),
            (
                "redis",
                [
                    str(binaries["redis-server"]),
                    "--port",
                    str(ports["redis"]),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                ],
            ),
        ):
            log = (tmp / f"{name}.log").open("wb")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
            e2e.wait_port(
                ports["mqtt" if name == "mosquitto" else "redis"],
                procs[-1][1],
                tmp / f"{name}.log",
                args.start_timeout,
            )
        # the stream and group, as the daemon's broker creates them at start-up
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "-p",
                str(ports["redis"]),
                "XGROUP",
                "CREATE",
                QUEUE,
                f"{QUEUE}-workers",
                "$",
                "MKSTREAM",
            ],
            check=True,
            capture_output=True,
        )
        log = (tmp / "worker.log").open("wb")
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(("worker", worker))
        try:
            per_run = asyncio.run(measure(args, ports, worker, tmp))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        e2e.stop_process(worker, "worker")  # SIGTERM: a profiled worker writes its stats
        if args.round_trips:
            for line in (tmp / "worker.log").read_text().splitlines():
                if "worker_runs_done" in line:
                    print(line)
        print(
            f"median worker CPU {statistics.median(per_run):.3f} ms/run; load average "
            f"{os.getloadavg()[0]:.2f} at the end"
        )
        return 0
    finally:
        for name, proc in reversed(procs):
            e2e.stop_process(proc, name)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
