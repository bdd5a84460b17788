"""Soak test: the daemon under a steady mixed load, watched for leaks (not in CI).

Run from the repository root::

    .venv/bin/python bench/soak.py                 # 10 minutes at 200 msg/s
    .venv/bin/python bench/soak.py --minutes 2     # a quick check

It starts its own Mosquitto on a free loopback port (the same config as
``bench/e2e.py``) and ``flowerpower-daemon run`` with ``examples/sensors``
and three MQTT triggers on the ``temperature`` pipeline (``payload: auto``,
``payload: json``, and ``json`` with ``payload_input: null``, which requires
a JSON object). One client publishes ``--rate`` messages per second at
QoS 1 (MQTT v5, a response topic and the sequence number as correlation
data), paced to the schedule: ``--bad`` of them bad (wrong input type,
invalid JSON, too deep, too large, invalid UTF-8, not an object, random
bytes), the rest good readings. Every message must get exactly one answer
on the response topic: ``success`` for the good ones, ``failed`` with a
reason for the bad ones.

Every 10 s it samples the daemon's RSS (``VmRSS``), open file descriptors
(``/proc/<pid>/fd``) and CPU; per minute it reports messages, answers and
latency (publish -> answer) p50 / p99 / max. The verdict compares the first
sample after ``--warmup`` seconds with the last minute: RSS within
``--rss-tolerance-mb``, descriptors within ``--fd-tolerance``, the last
minute's p99 at most ``--p99-factor`` x the first full minute's (plus 5 ms),
no message lost or answered twice, no wrong status. Exit status 0 when
the verdict is ``PASS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from e2e import (  # bench/ is on sys.path when run as a script
    HOST,
    MOSQUITTO_CONF,
    NODELAY,
    PROJECT,
    VENV_BIN,
    _terminated,
    free_port,
    pct,
    spawned,
    tail,
    wait_port,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

STATUS_TOPIC = "flowerpower/status"
REPLY_TOPIC = "soak/replies"
MAX_PAYLOAD = 16 * 1024
SAMPLE_EVERY = 10.0
DRAIN_TIMEOUT = 60.0
START_TIMEOUT = 120.0

#: kind -> (trigger, weight among the bad kinds)
BAD_KINDS = {
    "wrong_type": ("json", 3),
    "bad_json": ("json", 2),
    "too_deep": ("auto", 2),
    "too_large": ("auto", 1),
    "bad_utf8": ("json", 2),
    "not_object": ("obj", 1),
    "random_bytes": ("auto", 1),
}


def payload_for(kind: str, rng: random.Random) -> bytes:
    if kind == "good":
        return json.dumps({"temperature": round(rng.uniform(-20, 45), 2)}).encode()
    if kind == "wrong_type":
        return json.dumps({"temperature": rng.choice(["hot", [1, 2], True, {"c": 1}])}).encode()
    if kind == "bad_json":
        return b'{"temperature": 21.5' + rng.choice([b"", b",", b"x}", b"]", b" 1}"])
    if kind == "too_deep":
        depth = rng.choice([40, 300, 2000])
        return b"[" * depth + b"]" * depth
    if kind == "too_large":
        return b"x" * (MAX_PAYLOAD + rng.randrange(1, 4096))
    if kind == "bad_utf8":
        return b'{"temperature": "' + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"]) + b'"}'
    if kind == "not_object":
        return json.dumps(rng.choice([[1, 2], 3.5, "s", None])).encode()
    # random bytes: never valid JSON nor UTF-8 (a 0xff first byte), so a failure
    return b"\xff" + rng.randbytes(rng.randrange(0, 200))


@dataclass
class Sent:
    kind: str
    t_sent: float
    answers: int = 0
    status: str | None = None
    latency_ms: float | None = None


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    cpu_s: float
    load: float  # the machine's 1-minute load average


@dataclass
class Soak:
    args: argparse.Namespace
    pid: int
    sent: dict[int, Sent] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    t0: float = 0.0
    foreign: int = 0
    wrong_kinds: dict[str, int] = field(default_factory=dict)
    answered: int = 0
    published: bool = False  # every message of the run is out
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------ the daemon

    def sample(self) -> Sample:
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        s = Sample(time.monotonic() - self.t0, rss, fds, cpu, os.getloadavg()[0])
        self.samples.append(s)
        return s

    # ------------------------------------------------------------ the load

    async def reader(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            now = time.monotonic()
            if msg.topic.value != REPLY_TOPIC:
                continue
            corr = getattr(msg.properties, "CorrelationData", None)
            entry = self.sent.get(int(corr)) if corr else None
            if entry is None:
                self.foreign += 1
                continue
            entry.answers += 1
            if entry.answers == 1:
                self.answered += 1
                if self.published and self.answered == len(self.sent):
                    self.all_answered.set()
                assert isinstance(msg.payload, bytes | bytearray)
                entry.status = json.loads(msg.payload)["status"]
                entry.latency_ms = (now - entry.t_sent) * 1000.0

    async def publisher(self, client: aiomqtt.Client, duration: float) -> None:
        args = self.args
        rng = random.Random(args.seed)
        kinds = list(BAD_KINDS)
        weights = [w for _, w in BAD_KINDS.values()]
        window = asyncio.Semaphore(1000)
        tasks: set[asyncio.Task[None]] = set()

        async def send(seq: int, topic: str, payload: bytes) -> None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = REPLY_TOPIC
            props.CorrelationData = str(seq).encode()
            try:
                await client.publish(topic, payload, qos=1, properties=props)
            finally:
                window.release()

        seq = 0
        start = time.monotonic()
        while True:
            due = start + seq / args.rate
            if due - start >= duration:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = "good" if rng.random() >= args.bad else rng.choices(kinds, weights)[0]
            trigger = "auto" if kind == "good" else BAD_KINDS[kind][0]
            payload = payload_for(kind, rng)
            await window.acquire()
            self.sent[seq] = Sent(kind, time.monotonic())
            task = asyncio.create_task(send(seq, f"soak/{trigger}/d{seq % 1000}", payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            seq += 1
        await asyncio.gather(*tasks)
        self.published = True
        if self.answered == len(self.sent):
            self.all_answered.set()

    async def sampler(self, stop: asyncio.Event) -> None:
        next_at = self.t0
        while not stop.is_set():
            s = self.sample()
            print(
                f"[soak] t={s.t:6.0f}s  RSS {s.rss_kb / 1024:7.1f} MiB  fds {s.fds:4d}  "
                f"sent {len(self.sent):7d}  answered {self.answered:7d}",
                file=sys.stderr,
                flush=True,
            )
            next_at += SAMPLE_EVERY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))

    async def drain(self) -> None:
        """Wait (bounded) until every message has its answer, then a little for duplicates."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self.all_answered.wait()
        await asyncio.sleep(1.0)  # a late duplicate would show up here


# ---------------------------------------------------------------- report


def minute_rows(soak: Soak) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for entry in soak.sent.values():
        minute = int((entry.t_sent - soak.t0) // 60)
        row = rows.setdefault(
            minute,
            {
                "minute": minute + 1,
                "sent": 0,
                "answered": 0,
                "ok": 0,
                "failed": 0,
                "lat": [],
                "lost": 0,
                "twice": 0,
                "wrong": 0,
            },
        )
        row["sent"] += 1
        if entry.answers == 0:
            row["lost"] += 1
            continue
        row["answered"] += 1
        row["twice"] += entry.answers > 1
        row["ok" if entry.status == "success" else "failed"] += 1
        expected = "success" if entry.kind == "good" else "failed"
        if entry.status != expected:
            row["wrong"] += 1
            soak.wrong_kinds[entry.kind] = soak.wrong_kinds.get(entry.kind, 0) + 1
        row["lat"].append(entry.latency_ms)
    return [rows[k] for k in sorted(rows)]


def report(soak: Soak) -> bool:
    args = soak.args
    print()
    print(
        f"soak: {args.minutes:g} min at {args.rate:g} msg/s, {args.bad:.0%} bad, QoS 1, "
        f"MQTT v5, Mosquitto on {HOST}; warm-up {args.warmup:g} s"
    )
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("every 10 s: the daemon's RSS, open fds and CPU; the machine's load average; latency")
    print("of the messages sent since the previous sample")
    print(
        f"{'t (s)':>6}{'RSS (MiB)':>11}{'fds':>6}{'CPU %':>7}{'load':>6}{'p50 ms':>9}{'p99 ms':>9}"
    )
    prev: Sample | None = None
    for s in soak.samples:
        cpu, p50, p99 = f"{'-':>7}", f"{'-':>9}", f"{'-':>9}"
        if prev is not None and s.t > prev.t:
            cpu = f"{(s.cpu_s - prev.cpu_s) / (s.t - prev.t) * 100:7.0f}"
            lo, hi = soak.t0 + prev.t, soak.t0 + s.t
            lat = [
                e.latency_ms
                for e in soak.sent.values()
                if lo <= e.t_sent < hi and e.latency_ms is not None
            ]
            if lat:
                p50, p99 = f"{pct(lat, 50):9.2f}", f"{pct(lat, 99):9.2f}"
        print(f"{s.t:6.0f}{s.rss_kb / 1024:11.1f}{s.fds:6d}{cpu}{s.load:6.1f}{p50}{p99}")
        prev = s
    print()
    rows = minute_rows(soak)
    print(
        f"{'minute':>6}{'sent':>8}{'answered':>10}{'ok':>8}{'failed':>8}{'lost':>6}{'twice':>7}"
        f"{'wrong':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    for r in rows:
        lat = r["lat"]
        p50, p99, mx = (pct(lat, 50), pct(lat, 99), max(lat)) if lat else (0.0, 0.0, 0.0)
        print(
            f"{r['minute']:>6}{r['sent']:>8}{r['answered']:>10}{r['ok']:>8}{r['failed']:>8}"
            f"{r['lost']:>6}{r['twice']:>7}{r['wrong']:>7}{p50:>9.2f}{p99:>9.2f}{mx:>9.1f}"
        )

    # Verdict.
    problems: list[str] = []
    after = [s for s in soak.samples if s.t >= args.warmup]
    end = soak.samples[-1].t if soak.samples else 0.0
    last = [s for s in soak.samples if s.t >= end - 60 and s.t >= args.warmup]
    if not after or not last:
        problems.append("too few samples after the warm-up")
    else:
        base = after[0]
        rss_growth = (max(s.rss_kb for s in last) - base.rss_kb) / 1024
        fd_growth = max(s.fds for s in last) - base.fds
        print()
        print(
            f"RSS: {base.rss_kb / 1024:.1f} MiB at t={base.t:.0f}s -> max "
            f"{max(s.rss_kb for s in last) / 1024:.1f} MiB in the last minute "
            f"({rss_growth:+.1f} MiB; tolerance {args.rss_tolerance_mb:g})"
        )
        print(
            f"fds: {base.fds} -> max {max(s.fds for s in last)} in the last minute "
            f"({fd_growth:+d}; tolerance {args.fd_tolerance})"
        )
        if rss_growth > args.rss_tolerance_mb:
            problems.append(f"RSS grew by {rss_growth:.1f} MiB")
        if fd_growth > args.fd_tolerance:
            problems.append(f"open fds grew by {fd_growth}")
    full = [r for r in rows if r["lat"]]
    if len(full) >= 2:
        first, final = pct(full[0]["lat"], 99), pct(full[-1]["lat"], 99)
        print(
            f"p99: {first:.2f} ms in minute {full[0]['minute']} -> {final:.2f} ms in minute "
            f"{full[-1]['minute']} (limit {args.p99_factor:g}x + 5 ms)"
        )
        if final > args.p99_factor * first + 5.0:
            problems.append(f"p99 latency rose from {first:.1f} to {final:.1f} ms")
    lost = sum(r["lost"] for r in rows)
    twice = sum(r["twice"] for r in rows)
    wrong = sum(r["wrong"] for r in rows)
    total = sum(r["sent"] for r in rows)
    lat_all = [x for r in rows for x in r["lat"]]
    print(
        f"messages: {total} sent, {lost} lost, {twice} answered twice, {wrong} wrong status; "
        f"overall p50 {pct(lat_all, 50) if lat_all else 0:.2f} ms, "
        f"p99 {pct(lat_all, 99) if lat_all else 0:.2f} ms, mean "
        f"{statistics.fmean(lat_all) if lat_all else 0:.2f} ms"
    )
    if lost or twice or wrong:
        problems.append(f"{lost} lost, {twice} answered twice, {wrong} wrong status")
    if soak.wrong_kinds:
        print(f"wrong status by kind: {soak.wrong_kinds}")
    verdict = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    print(f"verdict: {verdict}")
    return not problems


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace, port: int, daemon_pid: int, daemon_log: Path) -> bool:
    quiet = logging.getLogger("soak.mqtt")
    quiet.setLevel(logging.ERROR)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 65535
    async with aiomqtt.Client(
        HOST,
        port,
        identifier=f"soak-client-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
        max_inflight_messages=1000,
        properties=props,
        timeout=30,
        logger=quiet,
    ) as client:
        await client.subscribe(STATUS_TOPIC, qos=1)
        await client.subscribe(REPLY_TOPIC, qos=1)
        try:
            async with asyncio.timeout(args.start_timeout):
                async for msg in client.messages:
                    if msg.topic.value == STATUS_TOPIC:
                        assert isinstance(msg.payload, bytes | bytearray)
                        if json.loads(msg.payload).get("status") == "online":
                            break
        except TimeoutError:
            raise TimeoutError(
                f"daemon not online after {args.start_timeout:g} s:\n{tail(daemon_log)}"
            ) from None
        soak = Soak(args, daemon_pid)
        soak.t0 = time.monotonic()
        reader = asyncio.create_task(soak.reader(client))
        stop = asyncio.Event()
        sampler = asyncio.create_task(soak.sampler(stop))
        try:
            await soak.publisher(client, args.minutes * 60)
            await soak.drain()
        finally:
            stop.set()
            await sampler
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
        soak.sample()
        if soak.foreign:
            print(f"[soak] {soak.foreign} answers without a known correlation", file=sys.stderr)
        return report(soak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s (default 200)")
    parser.add_argument("--bad", type=float, default=0.3, help="share of bad messages (0.3)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the RSS/fd baseline (default: min(60, duration/4))",
    )
    parser.add_argument("--rss-tolerance-mb", type=float, default=10.0)
    parser.add_argument("--fd-tolerance", type=int, default=5)
    parser.add_argument("--p99-factor", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or not 0 <= args.bad <= 1:
        parser.error("--minutes and --rate must be > 0, --bad within 0..1")
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 15)

    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    mosquitto = shutil.which("mosquitto", path=path)
    daemon_bin = VENV_BIN / "flowerpower-daemon"
    if mosquitto is None:
        print("mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    tmp = Path(tempfile.mkdtemp(prefix="fp-soak-"))
    port = free_port()
    try:
        (tmp / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=port, host=HOST))
        state = tmp / "state"
        state.mkdir()
        config = tmp / "daemon.yml"
        triggers = [
            {
                "name": "auto",
                "type": "mqtt",
                "pipeline": "temperature",
                "topic": "soak/auto/{device}",
            },
            {
                "name": "json",
                "type": "mqtt",
                "pipeline": "temperature",
                "topic": "soak/json/{device}",
                "payload": "json",
            },
            {
                "name": "obj",
                "type": "mqtt",
                "pipeline": "temperature",
                "topic": "soak/obj/{device}",
                "payload": "json",
                "payload_input": None,
            },
        ]
        config.write_text(
            json.dumps(
                {
                    "project": str(PROJECT),
                    "state_dir": str(state),
                    "log_level": "WARNING",
                    "mqtt": {
                        "url": f"mqtt://{HOST}:{port}",
                        "client_id": "soak-daemon",
                        "status_topic": STATUS_TOPIC,
                        "max_payload_bytes": MAX_PAYLOAD,
                    },
                    "triggers": triggers,
                }
            )
        )  # JSON is YAML
        env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"}
        try:
            with contextlib.ExitStack() as stack:
                broker = stack.enter_context(
                    spawned(
                        [mosquitto, "-c", str(tmp / "mosquitto.conf")],
                        "mosquitto",
                        tmp / "mosquitto.log",
                    )
                )
                wait_port(port, broker, tmp / "mosquitto.log", args.start_timeout)
                daemon = stack.enter_context(
                    spawned(
                        [str(daemon_bin), "run", "-c", str(config)],
                        "daemon",
                        tmp / "daemon.log",
                        cwd=tmp,
                        env=env,
                    )
                )
                ok = asyncio.run(run(args, port, daemon.pid, tmp / "daemon.log"))
                if daemon.poll() is not None:
                    print(f"daemon exited ({daemon.returncode}):\n{tail(tmp / 'daemon.log')}")
                    return 1
        except (TimeoutError, RuntimeError, aiomqtt.MqttError) as exc:
            print(f"error: {exc}\n{tail(tmp / 'daemon.log')}", file=sys.stderr)
            return 1
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"[soak] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
