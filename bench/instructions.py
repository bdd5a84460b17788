"""Instructions per message of one daemon build, under callgrind: a figure load does not move.

Run from the repository root::

    git worktree add /tmp/fp-base HEAD~1                    # a build to compare against
    .venv/bin/python bench/instructions.py /tmp/fp-base     # then: ... bench/instructions.py .

Starts its own Mosquitto (as ``e2e.py``) and one ``flowerpower-daemon run``
(``ab.py``'s config: ``examples/sensors``, topic ``d0/{device}/temperature``)
under ``valgrind --tool=callgrind --instr-atstart=no``, the build's directory
first on its ``PYTHONPATH`` (same venv: only our code differs). Once the
daemon answers it sends ``--warm`` messages, switches callgrind's
instrumentation on (``callgrind_control -i on``), sends ``--m`` messages
(window ``--window``, QoS 1), switches it off and prints the user-space
instructions the daemon executed per message (all its threads). System
calls are not counted (their cost is in the kernel): judge a change that
saves system calls with ``ab.py``. Two runs of one build differ by a few
percent (how messages batch into loop turns varies); under callgrind the
daemon runs some 50x slower, so a run of 2,000 messages takes a minute or two.
``--out FILE`` keeps callgrind's output for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab
import e2e


async def drive(
    port: int,
    proc: Any,
    tmp: Path,
    args: argparse.Namespace,
    on: Callable[[], None],
    off: Callable[[], None],
) -> float:
    """Warm the daemon up, then send the measured messages between ``on`` and ``off``."""
    async with aiomqtt.Client(
        e2e.HOST,
        port,
        identifier=f"fp-instructions-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=e2e.NODELAY,
        max_inflight_messages=max(20, args.window),
        timeout=60,
    ) as mqtt:
        await mqtt.subscribe("d0/results", qos=1)
        client = e2e.Client(mqtt)
        reader = asyncio.ensure_future(client.reader())
        try:
            seq = await ab.ready(client, "d0", proc, tmp / "d0.log", 0)
            await client.throughput(ab.target("d0"), args.warm, seq, args.window)
            seq += args.warm
            on()
            try:
                return await client.throughput(ab.target("d0"), args.m, seq, args.window)
            finally:
                off()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("build", help="a directory with flowerpower_daemon/ (e.g. '.')")
    parser.add_argument("--m", type=int, default=2000, help="measured messages (default 2000)")
    parser.add_argument("--warm", type=int, default=500, help="warm-up messages (default 500)")
    parser.add_argument("--window", type=int, default=100, help="outstanding (default 100)")
    parser.add_argument("--out", type=Path, default=None, help="keep callgrind's output here")
    args = parser.parse_args(argv)
    build = str(Path(args.build).resolve())
    if not (Path(build) / "flowerpower_daemon" / "__init__.py").exists():
        parser.error(f"{build} has no flowerpower_daemon package")
    path = os.pathsep.join([os.environ["PATH"], "/usr/sbin"])
    tools = {
        name: shutil.which(name, path=path)
        for name in ("mosquitto", "valgrind", "callgrind_control", "callgrind_annotate")
    }
    missing = [name for name, found in tools.items() if found is None]
    if missing:
        print(
            f"not found: {', '.join(missing)} (apt-get install mosquitto valgrind)", file=sys.stderr
        )
        return 2
    e2e.START_TIMEOUT = 900.0  # imports under valgrind
    e2e.STOP_TIMEOUT = 300.0  # callgrind writes its output on exit
    tmp = Path(tempfile.mkdtemp(prefix="fp-instructions-"))
    out = args.out.resolve() if args.out is not None else tmp / "callgrind.out"
    port = e2e.free_port()
    try:
        (tmp / "mosquitto.conf").write_text(e2e.MOSQUITTO_CONF.format(port=port, host=e2e.HOST))
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(
                e2e.spawned(
                    [str(tools["mosquitto"]), "-c", str(tmp / "mosquitto.conf")],
                    "mosquitto",
                    tmp / "m.log",
                )
            )
            e2e.wait_port(port, broker, tmp / "m.log", e2e.START_TIMEOUT)
            env = dict(os.environ, PYTHONPATH=build, HAMILTON_TELEMETRY_ENABLED="false")
            cmd = [
                str(tools["valgrind"]),
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(e2e.VENV_BIN / "flowerpower-daemon"),
                "run",
                "-c",
                str(ab.config("d0", tmp, port)),
            ]
            proc = stack.enter_context(e2e.spawned(cmd, "d0", tmp / "d0.log", cwd=tmp, env=env))

            def instrument(state: str) -> Callable[[], None]:
                return lambda: subprocess.run(
                    [str(tools["callgrind_control"]), "-i", state, str(proc.pid)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )

            try:
                rate = asyncio.run(
                    drive(port, proc, tmp, args, instrument("on"), instrument("off"))
                )
            except (
                TimeoutError,
                RuntimeError,
                aiomqtt.MqttError,
                subprocess.SubprocessError,
            ) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        # The daemon has exited (stopped by spawned()), so its output is complete.
        text = subprocess.run(
            [str(tools["callgrind_annotate"]), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        found = re.search(r"([\d,]+)\s+(?:\(100\.0%\)\s+)?PROGRAM TOTALS", text)
        if found is None:
            print(f"no totals in callgrind's output:\n{text[:2000]}", file=sys.stderr)
            return 1
        total = int(found.group(1).replace(",", ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"build {build}: {total / args.m:,.0f} instructions per message "
        f"({total:,} for {args.m} messages; {rate:.0f} msg/s under callgrind)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
