"""Per-call cost of ``FlowerPowerProject.run`` next to a bare, reused Hamilton driver.

Writes a throw-away project with a trivial 3-node pipeline, builds a bare
``hamilton.driver.Driver`` from the very module the project runner imported,
then times both with the same inputs and final vars in short interleaved
rounds (so load on the machine hits both alike). Prints min and median per
call, the ratio of the mins and of the medians, and the median of the
per-round (paired) ratios; the goal is a ratio of at most 1.3.

    .venv/bin/python bench/runner.py [--rounds 40] [--number 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HAMILTON_TELEMETRY_ENABLED", "false")

from hamilton import driver

from flowerpower_daemon.project import FlowerPowerProject

PIPELINE = '''\
"""Three trivial nodes in a chain."""


def doubled(x: int) -> int:
    return x * 2


def shifted(doubled: int) -> int:
    return doubled + 1


def label(shifted: int) -> str:
    return f"v{shifted}"
'''

INPUTS = {"x": 21}
FINAL_VARS = ["label"]
GOAL = 1.3


def write_project(root: Path) -> None:
    """A minimal project: conf/project.yml, one pipeline module and its YAML."""
    (root / "conf" / "pipelines").mkdir(parents=True)
    (root / "pipelines").mkdir()
    (root / "conf" / "project.yml").write_text("name: bench\n")
    (root / "pipelines" / "__init__.py").write_text("")
    (root / "pipelines" / "chain.py").write_text(PIPELINE)
    (root / "conf" / "pipelines" / "chain.yml").write_text("run:\n  final_vars: [label]\n")


def per_call(fn: Callable[[], Any], rounds: int, number: int) -> list[float]:
    """Seconds per call for each round (timeit's repeat, one round at a time)."""
    timer = timeit.Timer(fn)
    return [timer.timeit(number) / number for _ in range(rounds)]


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:8.2f} us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timing rounds (default 40)")
    parser.add_argument("--number", type=int, default=500, help="calls per round (default 500)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        root = Path(tmp) / "project"
        write_project(root)
        project = FlowerPowerProject.load(str(root), cache_dir=str(Path(tmp) / "cache"))
        expected = {"label": "v43"}
        assert project.run("chain", INPUTS) == expected

        module = project.runner.prepare("chain").driver.graph_modules[0]
        bare = driver.Builder().with_modules(module).build()
        assert bare.execute(FINAL_VARS, inputs=dict(INPUTS)) == expected

        def via_project() -> Any:
            return project.run("chain", INPUTS)

        def via_driver() -> Any:
            return bare.execute(FINAL_VARS, inputs=dict(INPUTS))

        for fn in (via_project, via_driver):  # warm up both paths
            per_call(fn, 1, args.number // 4 or 1)
        project_times: list[float] = []
        driver_times: list[float] = []
        for _ in range(args.rounds):
            driver_times += per_call(via_driver, 1, args.number)
            project_times += per_call(via_project, 1, args.number)

    rows = [
        ("hamilton Driver.execute (bare, reused)", driver_times),
        ("FlowerPowerProject.run", project_times),
    ]
    print(
        f"3-node pipeline, {args.rounds} rounds x {args.number} calls, "
        f"Python {sys.version.split()[0]}"
    )
    print(f"{'':40} {'min':>11} {'median':>11}")
    for name, times in rows:
        print(f"{name:40} {fmt(min(times))} {fmt(statistics.median(times))}")
    ratio_min = min(project_times) / min(driver_times)
    ratio_median = statistics.median(project_times) / statistics.median(driver_times)
    paired = statistics.median(p / d for p, d in zip(project_times, driver_times, strict=True))
    verdict = "ok" if ratio_min <= GOAL else "over goal"
    print(f"{'ratio project / bare':40} {ratio_min:10.2f}x {ratio_median:10.2f}x")
    print(f"{'ratio, median of paired rounds':40} {paired:10.2f}x")
    print(f"goal: <= {GOAL}x (on min): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
