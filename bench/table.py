"""What the benchmarks print: issue 13's table rows, and e2e.py's detailed echo comparison.

Rows: a figure beside its floor, the ratio, the goal; printed and as JSON.

``e2e.py`` (through ``e2e_rows.py``) and ``fleet.py`` print issue 13's speed
table with these and write it with ``--json FILE`` as one object whose keys
name the rows (``p50_publish_to_result_memory_queue``, ``throughput_redis_1_worker``,
...), each ``{"row", "value", "unit", "floor", "floor_is", "ratio", "goal", "met", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mqttbench import HOST, Sample, pct


@dataclass
class Row:
    """One line of the issue's table: a figure beside its floor, the ratio, the goal."""

    key: str
    label: str
    unit: str
    value: float
    floor: float
    floor_is: str
    ratio: float | None  # value / floor, or as ``detail["ratio_is"]`` says
    goal: str
    met: bool | None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.label,
            "value": self.value,
            "unit": self.unit,
            "floor": self.floor,
            "floor_is": self.floor_is,
            "ratio": self.ratio,
            "goal": self.goal,
            "met": self.met,
            **self.detail,
        }


def ratio_row(
    key: str,
    label: str,
    unit: str,
    value: float,
    floor: float,
    floor_is: str,
    goal: float,
    higher_is_better: bool = False,
    ratio: float | None = None,
    **detail: Any,
) -> Row:
    """A row judged on value / floor (or on ``ratio``, e.g. a median of per-round ratios)."""
    plain = value / floor if floor else None
    r = ratio if ratio is not None else plain
    met = None if r is None else (r >= goal if higher_is_better else r <= goal)
    goal_text = f"{'>=' if higher_is_better else '<='} {goal:g}x"
    if ratio is not None:
        detail.update(ratio_is="median of the per-round ratios", ratio_of_medians=plain)
    return Row(key, label, unit, value, floor, floor_is, r, goal_text, met, detail)


def print_table(rows: list[Row]) -> None:
    """The issue's table: figure, value, floor, ratio, goal, verdict."""
    fmt = {
        "ms": "{:.2f} ms",
        "msg/s": "{:.0f} msg/s",
        "%": "{:.2f} %",
        "MiB": "{:.1f} MiB",
        "s": "{:.2f} s",
    }
    print()
    print("issue 13, speed (one machine): each figure beside its floor, measured in this run")
    print(f"{'figure':<48}{'value':>13}{'floor':>13}{'ratio':>8}  {'goal':<18}")
    for r in rows:
        f = fmt.get(r.unit, "{:.3f} " + r.unit)
        ratio = r.ratio
        verdict = "-" if r.met is None else ("ok" if r.met else "MISSED")
        print(
            f"{r.label:<48}{f.format(r.value):>13}{f.format(r.floor):>13}"
            f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>8}  {r.goal:<18}{verdict}"
        )
    print("floors:")
    for r in rows:
        print(f"  {r.label}: {r.floor_is}")


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out: dict[str, Any] = dict(meta)
    for r in rows:
        out[r.key] = r.to_json()
    path.write_text(json.dumps(out, indent=2) + "\n")


# ------------------------------------------------ e2e.py: the echo comparison


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
    print(
        f"e2e benchmark: n={args.n} sequential round trips, m={args.m} messages "
        f"(window {args.window}), MQTT v5, QoS 1, Mosquitto on {HOST}; daemon "
        f"max_concurrent_runs {args.max_concurrent_runs or 'default'}"
    )
    load = os.getloadavg()
    cpus = os.cpu_count() or 1
    busy = "  (busy machine: figures are noisy)" if res["load_before"] > cpus else ""
    print(
        f"machine: {cpus} CPUs, load average {res['load_before']:.1f} before, "
        f"{load[0]:.1f} after{busy}"
    )
    print(f"{'metric':<22}{'echo':>12}{'daemon':>12}{'ratio':>10}")
    for name, ev, dv in rows:
        fmt = "{:>12.0f}" if "msg/s" in name else "{:>12.3f}"
        ratio = f"{dv / ev:>10.2f}" if ev else f"{'-':>10}"
        print(f"{name:<22}" + fmt.format(ev) + fmt.format(dv) + ratio)
    print("ratio = daemon/echo (latency, CPU: lower is better; throughput: higher is better);")
    print(
        f"throughput: median of {args.rounds} rounds of {args.m} messages each, echo and "
        "daemon in turn;"
    )
    print("CPU/msg = process CPU time during the throughput rounds / messages")
    ratios = res["tput_ratios"]
    print(
        "throughput ratio per round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"  (median {statistics.median(ratios):.2f})"
    )
    print("(the goals are in the table at the end)")
    print()
    print("daemon round trip split by the result's time stamps (ms, latency run):")
    print(f"  {'segment':<62}{'p50':>9}{'p99':>9}")
    for name, values in breakdown(d["samples"]):
        if values:
            print(f"  {name:<62}{pct(values, 50):>9.3f}{pct(values, 99):>9.3f}")
    print()
    print(
        f"daemon RSS: {d['rss'] / 2**20:.1f} MiB (after {d['runs']} runs); "
        f"spawn -> ready: {d['startup_s']:.2f} s (by {d['ready_by']})"
    )


def print_profile(path: Path, top: int) -> None:
    import pstats

    print()
    print(f"daemon profile (cProfile, all threads, run phase only; {path}):")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
