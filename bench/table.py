"""The benchmarks' table rows: a figure beside its floor, the ratio, the goal; printed and as JSON.

``e2e.py`` (through ``e2e_rows.py``) and ``fleet.py`` print issue 13's speed
table with these and write it with ``--json FILE`` as one object whose keys
name the rows (``p50_publish_to_result_memory_queue``, ``throughput_redis_1_worker``,
...), each ``{"row", "value", "unit", "floor", "floor_is", "ratio", "goal", "met", ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
