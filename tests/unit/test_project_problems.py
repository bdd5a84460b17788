"""One bad pipeline file does not block the others: only project.yml and a pipeline's own
files stop that pipeline, and every problem is still listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flowerpower_daemon.errors import ConfigError, PipelineNotFoundError
from flowerpower_daemon.project import FlowerPowerProject

if TYPE_CHECKING:
    from conftest import ProjectFactory

MODULE = "def out(x: int = 1) -> int:\n    return x * 2\n"
BIN = Path(sys.executable).parent


def make_mixed(projects: ProjectFactory, **kwargs: object) -> str:
    """``good`` is fine, ``typo`` has a misspelt key, ``orphan`` has a YAML but no module."""
    return projects.make(
        {"good": MODULE, "typo": MODULE},
        {
            "good": "run: {final_vars: [out]}\n",
            "typo": "run: {max_retry: 2}\n",
            "orphan": "run: {}\n",
        },
        **kwargs,  # type: ignore[arg-type]
    )


def test_good_pipeline_loads_and_runs_beside_broken_ones(projects: ProjectFactory) -> None:
    """The project loads; the valid pipeline runs; the broken ones are listed with their problems."""
    project = projects.open(make_mixed(projects))
    assert sorted(project.pipelines) == ["good"]
    assert project.run("good") == {"out": 2}
    assert project.problems_for("good") == []
    found = [(Path(p.file).name, p.key) for p in project.problems]
    assert found == [("orphan.yml", ""), ("typo.yml", "run.max_retry")]
    [typo] = project.problems_for("typo")
    assert "did you mean 'max_retries'?" in typo.message


@pytest.mark.parametrize("action", ["run", "show", "request"])
def test_broken_pipeline_fails_alone_naming_file_and_key(
    projects: ProjectFactory, action: str
) -> None:
    """Running or showing the broken pipeline raises its own problems, nothing else."""
    project = projects.open(make_mixed(projects))
    with pytest.raises(ConfigError) as info:
        getattr(project, action)("typo")
    [problem] = info.value.problems
    assert problem.file.endswith("conf/pipelines/typo.yml")
    assert problem.key == "run.max_retry"


def test_yaml_without_module_is_the_problem_of_that_pipeline(projects: ProjectFactory) -> None:
    """A YAML file without its module names the missing module when that pipeline is asked for."""
    project = projects.open(make_mixed(projects))
    with pytest.raises(ConfigError, match=r"no module pipelines/orphan\.py"):
        project.run("orphan")


def test_unknown_pipeline_lists_broken_ones_too(projects: ProjectFactory) -> None:
    """An unknown name is still PipelineNotFoundError, listing every pipeline of the project."""
    project = projects.open(make_mixed(projects))
    with pytest.raises(PipelineNotFoundError) as info:
        project.run("nope")
    assert info.value.available == ["good", "orphan", "typo"]


def test_broken_pipeline_can_be_deleted(projects: ProjectFactory) -> None:
    """``delete`` removes a pipeline whose YAML is broken (fixing by removal)."""
    project = projects.open(make_mixed(projects))
    removed = project.delete("typo")
    assert [Path(p).name for p in removed] == ["typo.py", "typo.yml"]
    assert project.problems_for("typo") == []
    assert sorted(project.pipelines) == ["good"]


def test_project_yml_problem_stops_every_pipeline(projects: ProjectFactory) -> None:
    """A problem in project.yml stops the load; the error lists every file's problems."""
    base = make_mixed(projects, project="name: x\nadaptr: {}\n")
    with pytest.raises(ConfigError) as info:
        FlowerPowerProject.load(base)
    found = [(Path(p.file).name, p.key) for p in info.value.problems]
    assert found == [("project.yml", "adaptr"), ("orphan.yml", ""), ("typo.yml", "run.max_retry")]


def test_reload_picks_up_a_fix(projects: ProjectFactory) -> None:
    """Fixing the broken file and reloading makes that pipeline runnable."""
    base = make_mixed(projects)
    project = projects.open(base)
    projects.write(base, "conf/pipelines/typo.yml", "run: {max_retries: 2}\n")
    project.reload()
    assert project.run("typo") == {"out": 2}
    assert [Path(p.file).name for p in project.problems] == ["orphan.yml"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flowerpower-daemon"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )


def test_cli_runs_the_good_pipeline_and_refuses_the_broken_one(projects: ProjectFactory) -> None:
    """``pipeline run good`` exits 0 beside a broken file; ``pipeline run typo`` exits 2 with one
    ``error:`` naming the file and the key."""
    base = make_mixed(projects)
    good = _cli("pipeline", "run", "good", "--base-dir", base)
    assert good.returncode == 0, good.stderr
    assert "typo" not in good.stderr
    bad = _cli("pipeline", "run", "typo", "--base-dir", base)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: 1 configuration problem(s):")
    assert "conf/pipelines/typo.yml: run.max_retry: unknown key; did you mean 'max_retries'?" in (
        bad.stderr
    )
    assert "orphan" not in bad.stderr
