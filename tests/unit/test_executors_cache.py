"""Executors (threads, processes, missing extras), adapters and Hamilton's result cache."""

from __future__ import annotations

import ast
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flowerpower_daemon.errors import DependencyMissingError, InputError
from flowerpower_daemon.project import FlowerPowerProject
from flowerpower_daemon.project._hamilton import ray_executor_kwargs

if TYPE_CHECKING:
    from conftest import CallLog, ProjectFactory

FOUR_SLEEPERS = """
import time


def a(delay: float) -> float:
    time.sleep(delay)
    return delay


def b(delay: float) -> float:
    time.sleep(delay)
    return delay


def c(delay: float) -> float:
    time.sleep(delay)
    return delay


def d(delay: float) -> float:
    time.sleep(delay)
    return delay
"""

FAN_OUT = """
import os

from hamilton.htypes import Collect, Parallelizable


def item(n: int) -> Parallelizable[int]:
    for i in range(n):
        yield i


def squared(item: int) -> tuple[int, int]:
    return item * item, os.getpid()


def collected(squared: Collect[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(squared)


def total(collected: list[tuple[int, int]]) -> int:
    return sum(value for value, _ in collected)


def pids(collected: list[tuple[int, int]]) -> list[int]:
    return sorted({pid for _, pid in collected})
"""

CACHED = """
def _log(word: str) -> None:
    with open({log!r}, "a") as fh:
        fh.write(word + "\\n")


def loaded(x: int) -> int:
    _log("loaded")
    return x + 1


def cleaned(loaded: int) -> int:
    _log("cleaned")
    return loaded * 2


def report(cleaned: int) -> str:
    _log("report")
    return f"value={{cleaned}}"
"""

ASYNC_NODE = """
async def value(x: int) -> int:
    return x
"""


def test_threadpool_runs_independent_nodes_in_parallel(projects: ProjectFactory) -> None:
    """Four independent 0.5 s nodes on a 4-thread pool finish in well under 2 s."""
    project = projects.load(
        {"sleepers": FOUR_SLEEPERS},
        {"sleepers": {"run": {"executor": {"type": "threadpool", "max_workers": 4}}}},
    )
    project.runner.prepare("sleepers")
    start = time.perf_counter()
    outputs = project.run("sleepers", {"delay": 0.5})
    elapsed = time.perf_counter() - start
    assert outputs == {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}
    assert elapsed < 1.5


def test_threadpool_fans_out_parallelizable(projects: ProjectFactory) -> None:
    """A Parallelizable/Collect pipeline on the thread pool collects every item."""
    project = projects.load({"fan_out": FAN_OUT}, {"fan_out": {"run": {"executor": "threadpool"}}})
    assert project.run("fan_out", {"n": 5}, final_vars=["total"]) == {"total": 30}


def test_threadpool_fans_out_with_postponed_annotations(projects: ProjectFactory) -> None:
    """A module using ``from __future__ import annotations`` still fans out on the pool."""
    project = projects.load(
        {"fan_out": "from __future__ import annotations\n" + FAN_OUT},
        {"fan_out": {"run": {"executor": "threadpool"}}},
    )
    assert project.run("fan_out", {"n": 4}, final_vars=["total"]) == {"total": 14}


def test_processpool_runs_parallelizable_collect(projects: ProjectFactory) -> None:
    """A Parallelizable/Collect pipeline on the process pool gives the right result."""
    project = projects.load(
        {"fan_out": FAN_OUT},
        {"fan_out": {"run": {"executor": {"type": "processpool", "max_workers": 2}}}},
    )
    outputs = project.run("fan_out", {"n": 6}, final_vars=["total", "pids"])
    assert outputs["total"] == sum(i * i for i in range(6))
    assert os.getpid() not in outputs["pids"]


@pytest.mark.parametrize("executor", ["ray", "dask"])
def test_missing_executor_extra_names_the_extra(projects: ProjectFactory, executor: str) -> None:
    """Choosing ray or dask without it installed says which extra to install."""
    if importlib.util.find_spec(executor) is not None:
        pytest.skip(f"{executor} is installed")
    project = projects.load({"fan_out": FAN_OUT}, {"fan_out": {"run": {"executor": executor}}})
    with pytest.raises(DependencyMissingError) as info:
        project.run("fan_out", {"n": 2})
    assert f"pip install 'flowerpower-daemon[{executor}]'" in str(info.value)
    assert isinstance(info.value, ImportError)


def _ray_task_executor_parameters() -> list[str]:
    """``RayTaskExecutor.__init__``'s parameters, read from Hamilton's source (ray may be absent)."""
    spec = importlib.util.find_spec("hamilton.plugins.h_ray")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    cls = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "RayTaskExecutor"
    )
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return [a.arg for a in init.args.args[1:]]


@pytest.mark.parametrize(
    ("ray", "executor", "expected"),
    [
        (
            {"ray_init_config": {"address": "auto", "num_cpus": 8}, "shutdown_ray_on_completion": True},
            {"type": "ray", "num_cpus": 2},
            {"num_cpus": 2, "ray_init_config": {"address": "auto"}, "skip_init": False},
        ),
        (
            {"ray_init_config": {"num_cpus": 4, "namespace": "fp"}},
            "ray",
            {"num_cpus": 4, "ray_init_config": {"namespace": "fp"}, "skip_init": True},
        ),
        ({}, "ray", {"num_cpus": None, "ray_init_config": {}, "skip_init": True}),
    ],
)
def test_ray_settings_reach_hamiltons_ray_executor(
    projects: ProjectFactory, ray: dict[str, object], executor: object, expected: dict[str, object]
) -> None:
    """adapter.ray.ray_init_config and shutdown_ray_on_completion become RayTaskExecutor's
    arguments (ray.init's keywords; init and shutdown around every run only when asked)."""
    project = projects.load(
        {"fan_out": FAN_OUT},
        {"fan_out": {"run": {"executor": executor}}},
        project={"name": "rayproj", "adapter": {"ray": ray}},
    )
    cfg = project.pipelines["fan_out"]
    kwargs = ray_executor_kwargs(cfg.run.executor, cfg.adapter)
    assert kwargs == expected
    assert list(kwargs) == _ray_task_executor_parameters()


@pytest.mark.parametrize(
    ("flag", "module", "extra"),
    [
        ("mlflow", "mlflow", "mlflow"),
        ("opentelemetry", "opentelemetry", "otel"),
        ("hamilton_tracker", "hamilton_sdk", "tracker"),
    ],
)
def test_missing_adapter_extra_names_the_extra(
    projects: ProjectFactory, flag: str, module: str, extra: str
) -> None:
    """Switching on an adapter whose package is missing says which extra to install."""
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    project = projects.load({"async_node": ASYNC_NODE.replace("async ", "")})
    result = project.execute(project.request("async_node", {"x": 1}, with_adapter={flag: True}))
    assert result.error is not None
    assert result.error.type == "DependencyMissingError"
    assert f"pip install 'flowerpower-daemon[{extra}]'" in result.error.message


def test_async_pipeline_rejects_other_executors(projects: ProjectFactory) -> None:
    """An async pipeline runs on the async driver, so a pool executor is refused by name."""
    project = projects.load(
        {"async_node": ASYNC_NODE}, {"async_node": {"run": {"executor": "threadpool"}}}
    )
    with pytest.raises(InputError, match="cannot use executor 'threadpool'"):
        project.run("async_node", {"x": 1})


def test_cache_skips_cached_nodes_and_recomputes_listed_ones(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """With cache on, a second run calls no cached node again, except those in ``recompute``."""
    log = call_log("cached")
    project = projects.load(
        {"cached": CACHED.format(log=str(log.path))},
        {"cached": {"run": {"cache": {"recompute": ["report"]}}}},
    )
    assert project.run("cached", {"x": 1}) == {"report": "value=4"}
    assert log.lines() == ["loaded", "cleaned", "report"]
    assert project.run("cached", {"x": 1}) == {"report": "value=4"}
    assert log.lines() == ["loaded", "cleaned", "report", "report"]
    assert project.run("cached", {"x": 2}) == {"report": "value=6"}
    assert log.count("loaded") == 2


def test_cache_true_caches_every_node(
    projects: ProjectFactory, call_log: Callable[[str], CallLog], tmp_path: Path
) -> None:
    """``cache: true`` caches every node, under the cache_dir given to load()."""
    log = call_log("cached")
    base = projects.make(
        {"cached": CACHED.format(log=str(log.path))}, {"cached": {"run": {"cache": True}}}
    )
    cache_dir = tmp_path / "hamilton-cache"
    project = FlowerPowerProject.load(base, cache_dir=str(cache_dir))
    for _ in range(3):
        assert project.run("cached", {"x": 1}) == {"report": "value=4"}
    assert log.lines() == ["loaded", "cleaned", "report"]
    assert (cache_dir / "cached").is_dir()
    assert not (Path(base) / ".hamilton_cache").exists()


def test_cache_override_per_run(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """A run can switch the cache on; runs without it still compute every node."""
    log = call_log("cached")
    project = projects.load({"cached": CACHED.format(log=str(log.path))})
    project.run("cached", {"x": 1}, cache=True)
    project.run("cached", {"x": 1}, cache=True)
    assert log.count("loaded") == 1
    project.run("cached", {"x": 1})
    assert log.count("loaded") == 2


def test_cache_is_refused_for_async_pipelines(projects: ProjectFactory) -> None:
    """Hamilton's async driver has no cache: asking for one is a clear error."""
    project = projects.load({"async_node": ASYNC_NODE}, {"async_node": {"run": {"cache": True}}})
    with pytest.raises(InputError, match="async driver does not support cache"):
        project.run("async_node", {"x": 1})
