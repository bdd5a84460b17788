"""Projects on fsspec's ``memory://`` filesystem, and scaffolding: init, new, delete."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import fsspec
import pytest

from flowerpower_daemon.errors import (
    ConfigError,
    PipelineExistsError,
    PipelineImportError,
    PipelineNotFoundError,
)
from flowerpower_daemon.project import FlowerPowerProject
from flowerpower_daemon.project.registry import ProjectFiles

if TYPE_CHECKING:
    from conftest import ProjectFactory

STATS = """
def count(readings: list[float]) -> int:
    return len(readings)


def mean(readings: list[float], count: int) -> float:
    return sum(readings) / count


def alert(mean: float, threshold: float) -> bool:
    return mean > threshold
"""

ASYNC_STATS = """
import asyncio


async def count(readings: list[float]) -> int:
    await asyncio.sleep(0)
    return len(readings)
"""


def listing(url: str) -> set[str]:
    """Every file under ``url``, relative to it."""
    files = ProjectFiles(url)
    return {str(p)[len(files.root) + 1 :] for p in files.fs.find(files.root)}


def test_memory_project_loads_and_runs(projects: ProjectFactory) -> None:
    """A project written into memory:// is validated, imported and run with its YAML config."""
    base = projects.make(
        {"stats": STATS},
        {"stats": {"run": {"inputs": {"readings": [1.0, 2.0, 6.0]}}, "params": {"threshold": 2.5}}},
        memory=True,
    )
    project = FlowerPowerProject.load(base, cache_dir="unused-by-this-test")
    assert base.startswith("memory://")
    assert list(project.pipelines) == ["stats"]
    assert project.run("stats") == {"alert": True}
    assert project.run("stats", {"readings": [1.0]}, final_vars=["mean", "alert"]) == {
        "mean": 1.0,
        "alert": False,
    }


def test_memory_project_runs_async_pipelines(projects: ProjectFactory) -> None:
    """An async pipeline from memory:// runs through ``arun``."""
    project = projects.load({"stats": ASYNC_STATS}, memory=True)

    async def main() -> dict[str, object]:
        with anyio.fail_after(60):
            return await project.arun("stats", {"readings": [1.0, 2.0]})

    assert anyio.run(main) == {"count": 2}


def test_memory_source_change_rebuilds(projects: ProjectFactory) -> None:
    """Rewriting a module in memory:// (even to the same size) is picked up by the next run."""
    base = projects.make({"calc": "def out(x: int) -> int:\n    return x + 1\n"}, memory=True)
    project = projects.open(base)
    assert project.run("calc", {"x": 1}) == {"out": 2}
    projects.write(base, "pipelines/calc.py", "def out(x: int) -> int:\n    return x + 2\n")
    assert project.run("calc", {"x": 1}) == {"out": 3}


def test_memory_errors_name_the_url(projects: ProjectFactory) -> None:
    """Errors about a memory:// module name its URL and line."""
    base = projects.make({"bad": "X = 1\nY = 1 / 0\n"}, memory=True)
    project = projects.open(base)
    with pytest.raises(PipelineImportError) as info:
        project.run("bad")
    assert f"{base}/pipelines/bad.py:2: importing the module raised ZeroDivisionError" in str(
        info.value
    )


def test_memory_project_caches(projects: ProjectFactory, tmp_path: Path) -> None:
    """Hamilton's cache works for a memory:// module (its source is visible to fingerprints)."""
    base = projects.make(
        {
            "cached": (
                "CALLS = []\n\n\ndef value(x: int) -> int:\n    CALLS.append(x)\n    return x * 3\n"
            )
        },
        {"cached": {"run": {"cache": True}}},
        memory=True,
    )
    project = FlowerPowerProject.load(base, cache_dir=str(tmp_path / "cache"))
    assert project.run("cached", {"x": 2}) == {"value": 6}
    assert project.run("cached", {"x": 2}) == {"value": 6}
    module = project.runner.prepare("cached").driver.graph_modules[0]
    assert module.CALLS == [2]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_init_scaffolds_into_base_dir_slash_name(
    projects: ProjectFactory, tmp_path: Path, where: str
) -> None:
    """``init(name, base_dir)`` creates base_dir/name and writes nothing into base_dir itself."""
    base_dir = str(tmp_path / "work") if where == "local" else projects.memory_url()
    project = FlowerPowerProject.init("plant", base_dir)
    assert project.name == "plant"
    assert project.files.base_dir == f"{base_dir}/plant"
    assert dict(project.pipelines) == {}
    assert listing(base_dir) == {
        "plant/README.md",
        "plant/conf/project.yml",
        "plant/hooks/__init__.py",
        "plant/pipelines/__init__.py",
    }


def test_init_keeps_existing_files(projects: ProjectFactory) -> None:
    """Running init on an existing project keeps its files."""
    base_dir = projects.memory_url()
    FlowerPowerProject.init("plant", base_dir)
    ProjectFiles(f"{base_dir}/plant").write_text("conf/project.yml", "name: renamed\n")
    assert FlowerPowerProject.init("plant", base_dir).name == "renamed"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_new_writes_a_working_template(
    projects: ProjectFactory, tmp_path: Path, where: str
) -> None:
    """``new(name)`` writes a module and YAML that load and run as they are."""
    base_dir = str(tmp_path) if where == "local" else projects.memory_url()
    project = FlowerPowerProject.init("plant", base_dir)
    config = project.new("daily_report")
    assert config.run.final_vars == ("total", "mean")
    assert config.params == {"factor": 2.0}
    assert project.run("daily_report") == {"total": 30.0, "mean": 6.0}
    assert project.run("daily_report", {"count": 2}) == {"total": 6.0, "mean": 3.0}
    reloaded = FlowerPowerProject.load(project.files.base_dir, cache_dir=str(tmp_path / "c"))
    assert list(reloaded.pipelines) == ["daily_report"]


def test_new_refuses_to_overwrite_unless_asked(projects: ProjectFactory) -> None:
    """Creating an existing pipeline fails unless ``overwrite=True``."""
    project = FlowerPowerProject.init("plant", projects.memory_url())
    project.new("report")
    project.files.write_text("pipelines/report.py", "def other() -> int:\n    return 1\n")
    with pytest.raises(PipelineExistsError, match="pipeline 'report' already exists"):
        project.new("report")
    project.new("report", overwrite=True)
    assert project.run("report") == {"total": 30.0, "mean": 6.0}


@pytest.mark.parametrize("name", ["2fast", "my-pipeline", "a b", ""])
def test_new_rejects_names_that_are_not_identifiers(projects: ProjectFactory, name: str) -> None:
    """A pipeline name must be a Python identifier (it names a module)."""
    project = FlowerPowerProject.init("plant", projects.memory_url())
    with pytest.raises(ConfigError, match="invalid pipeline name"):
        project.new(name)


def test_delete_removes_the_pipeline(projects: ProjectFactory) -> None:
    """``delete`` removes the module and the YAML, and the pipeline is gone."""
    project = FlowerPowerProject.init("plant", projects.memory_url())
    project.new("keep")
    project.new("drop")
    removed = project.delete("drop")
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == ["drop.py", "drop.yml"]
    assert list(project.pipelines) == ["keep"]
    assert not project.files.exists("pipelines/drop.py")
    assert not project.files.exists("conf/pipelines/drop.yml")
    with pytest.raises(
        PipelineNotFoundError, match="unknown pipeline 'drop'; pipelines in this project: keep"
    ):
        project.run("drop")
    with pytest.raises(PipelineNotFoundError):
        project.delete("drop")
    assert project.run("keep") == {"total": 30.0, "mean": 6.0}


def test_memory_projects_do_not_leak_between_tests(projects: ProjectFactory) -> None:
    """Each test's memory:// project lives under its own root."""
    first = projects.make({"a": STATS}, memory=True)
    second = projects.make({"a": STATS}, memory=True)
    assert first != second
    memfs = fsspec.filesystem("memory")
    assert memfs.exists(ProjectFiles(first).path("pipelines/a.py"))
