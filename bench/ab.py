"""A/B: two builds of the daemon, side by side on one Mosquitto, throughput rounds in turn.

Run from the repository root::

    git worktree add /tmp/fp-base HEAD~1          # the build to compare against
    .venv/bin/python bench/ab.py /tmp/fp-base .   # A = base, B = this checkout

Each build is a directory holding a ``flowerpower_daemon`` package; it is put
first on the daemon's ``PYTHONPATH``, so both run in this venv (same
dependencies) and differ only in our code. Both daemons run at once, each with
its own topics (``d0/{device}/temperature`` -> ``d0/results``, ``d1/...``), on
the example project, and the client sends ``--m`` messages (window
``--window``) to one, then the other, for ``--rounds`` rounds (the order
alternates). It prints each round's messages/s and CPU ms per message, and the
medians of the per-round B/A ratios: the machine's speed drifts by tens of
percent over a minute, and a paired ratio is the figure that holds still
(``e2e.py`` compares against an echo in the same way). An idle daemon costs the
other next to nothing.

Reuses ``e2e.py``'s broker config, client and process handling; every wait
is bounded and every child stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e

BUILDS = ("d0", "d1")


def target(name: str) -> e2e.Target:
    def request(seq: int) -> tuple[str, bytes]:
        return f"{name}/b{seq}/temperature", b'{"temperature": 21.5}'

    def reply_seq(payload: bytes) -> tuple[int, dict[str, Any] | None]:
        data = orjson.loads(payload)
        if data.get("status") != "success":
            raise RuntimeError(f"{name}: run did not succeed: {payload[:300]!r}")
        return int(data["outputs"]["device_id"][1:]), None

    return e2e.Target(name, f"{name}/results", request, reply_seq)


def config(name: str, tmp: Path, port: int) -> Path:
    state = tmp / f"state-{name}"
    state.mkdir()
    path = tmp / f"{name}.yml"
    path.write_text(
        f"project: {json.dumps(str(e2e.PROJECT))}\n"
        f"state_dir: {json.dumps(str(state))}\n"
        f"mqtt: {{url: 'mqtt://{e2e.HOST}:{port}', client_id: ab-{name}, "
        f"result_topic: '{name}/results', status_topic: '{name}/status'}}\n"
        "log_level: WARNING\n"
        "triggers:\n"
        f"  - {{name: temp, type: mqtt, pipeline: temperature, "
        f"topic: '{name}/{{device}}/temperature', qos: 1}}\n"
    )
    return path


async def ready(client: e2e.Client, name: str, proc: Any, log: Path, seq: int) -> int:
    """Probe until the daemon answers (bounded), then warm it up; returns the next seq."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + e2e.START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{e2e.tail(log)}")
        if loop.time() > deadline:
            raise TimeoutError(f"{name} not ready after {e2e.START_TIMEOUT} s:\n{e2e.tail(log)}")
        client.target = target(name)
        topic, payload = client.target.request(seq)
        fut = client.expect(seq)
        await client.client.publish(topic, payload, qos=1)
        seq += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, 0.5)
            break
    await client.latency(target(name), 200, seq)
    return seq + 200


async def measure(port: int, procs: dict[str, Any], tmp: Path, args: argparse.Namespace) -> Any:
    async with aiomqtt.Client(
        e2e.HOST, port, identifier=f"ab-client-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5, socket_options=e2e.NODELAY,
        max_inflight_messages=max(20, args.window), timeout=30,
    ) as mqtt:
        for name in BUILDS:
            await mqtt.subscribe(f"{name}/results", qos=1)
        client = e2e.Client(mqtt)
        reader = asyncio.ensure_future(client.reader())
        try:
            seq = 0
            for name in BUILDS:
                seq = await ready(client, name, procs[name], tmp / f"{name}.log", seq)
            tput: dict[str, list[float]] = {n: [] for n in BUILDS}
            cpu: dict[str, list[float]] = {n: [] for n in BUILDS}
            for r in range(args.rounds):
                for name in BUILDS if r % 2 == 0 else BUILDS[::-1]:
                    print(f"[ab] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    proc = psutil.Process(procs[name].pid)
                    c0 = e2e.cpu_seconds(proc)
                    tput[name].append(
                        await client.throughput(target(name), args.m, seq, args.window)
                    )
                    cpu[name].append((e2e.cpu_seconds(proc) - c0) * 1000.0 / args.m)
                    seq += args.m
            return tput, cpu
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "a", help="build A: a directory with flowerpower_daemon/ (then more PYTHONPATH "
        f"entries for that daemon, if any, separated by {os.pathsep!r})"
    )
    parser.add_argument("b", help="build B (the same form)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--m", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--window", type=int, default=100, help="outstanding (default 100)")
    args = parser.parse_args(argv)
    builds = [
        os.pathsep.join(str(Path(p).resolve()) for p in arg.split(os.pathsep))
        for arg in (args.a, args.b)
    ]
    for build in builds:
        if not (Path(build.split(os.pathsep)[0]) / "flowerpower_daemon" / "__init__.py").exists():
            parser.error(f"{build} has no flowerpower_daemon package")
    mosquitto = shutil.which("mosquitto", path=os.pathsep.join([os.environ["PATH"], "/usr/sbin"]))
    if mosquitto is None:
        print("mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="fp-ab-"))
    port = e2e.free_port()
    try:
        (tmp / "mosquitto.conf").write_text(e2e.MOSQUITTO_CONF.format(port=port, host=e2e.HOST))
        with contextlib.ExitStack() as stack:
            procs: dict[str, Any] = {}
            procs["broker"] = stack.enter_context(e2e.spawned(
                [mosquitto, "-c", str(tmp / "mosquitto.conf")], "mosquitto", tmp / "m.log"))
            e2e.wait_port(port, procs["broker"], tmp / "m.log", e2e.START_TIMEOUT)
            for name, build in zip(BUILDS, builds, strict=True):
                env = dict(os.environ, PYTHONPATH=build)
                cmd = [str(e2e.VENV_BIN / "flowerpower-daemon"), "run", "-c",
                       str(config(name, tmp, port))]
                procs[name] = stack.enter_context(
                    e2e.spawned(cmd, name, tmp / f"{name}.log", cwd=tmp, env=env))
            try:
                tput, cpu = asyncio.run(measure(port, procs, tmp, args))
            except (TimeoutError, RuntimeError, aiomqtt.MqttError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"A/B: {args.rounds} rounds of {args.m} messages (window {args.window}), "
          f"A = {builds[0]}, B = {builds[1]}")
    for label, name in zip("AB", BUILDS, strict=True):
        print(f"  {label} msg/s   " + " ".join(f"{x:7.0f}" for x in tput[name]))
        print(f"  {label} CPU ms  " + " ".join(f"{x:7.3f}" for x in cpu[name]))
    t_ratio = statistics.median(b / a for a, b in zip(tput["d0"], tput["d1"], strict=True))
    c_ratio = statistics.median(b / a for a, b in zip(cpu["d0"], cpu["d1"], strict=True))
    print(f"B/A, median of paired rounds: msg/s {t_ratio:.3f}, CPU per message {c_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
