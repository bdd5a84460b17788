"""FlowerPower's pipeline template runs here, with or without the ``flowerpower`` package.

``tests/fixtures/fp_template`` is a project made by FlowerPower 0.37.0 itself
(its ``generate.py`` says how), with the outputs its ``PipelineManager.run``
gave; these tests run it through our API and CLI and expect the same.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flowerpower_daemon.project import fpcompat

if TYPE_CHECKING:
    from conftest import ProjectFactory

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fp_template"
EXPECTED: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text())
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.machinery.PathFinder.find_spec("flowerpower") is not None,
    reason="a real flowerpower is installed: the shim is not used",
)


def _pipeline_module(name: str) -> Any:
    """The module the runner imported for pipeline ``name``."""
    return next(
        m
        for n, m in sys.modules.items()
        if n.startswith("flowerpower_daemon._pipelines.") and n.endswith(f".{name}")
    )


@pytest.fixture(autouse=True)
def _drop_shim() -> Iterator[None]:
    """Leave no shim module or finder behind for the next test."""
    yield
    for name in ("flowerpower.cfg", "flowerpower"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__flowerpower_daemon_shim__", False):
            del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, fpcompat.ShimFinder)]


@pytest.fixture
def fp_project(tmp_path: Path) -> Path:
    """A copy of the FlowerPower-made project (runs must not write into the repository)."""
    target = tmp_path / "fp_project"
    shutil.copytree(FIXTURE / "project", target)
    return target


def test_template_runs_through_the_api_with_flowerpowers_outputs(
    projects: ProjectFactory, fp_project: Path
) -> None:
    """The 0.37 template module imports without flowerpower and gives PipelineManager's outputs."""
    project = projects.open(str(fp_project))
    assert project.run("hello") == EXPECTED["default"]["outputs"]
    request = EXPECTED["request"]
    assert project.run("hello", request["inputs"]) == request["outputs"]


def test_template_runs_through_the_cli_with_flowerpowers_outputs(fp_project: Path) -> None:
    """``flowerpower-daemon pipeline run hello`` on the FlowerPower-made project."""
    for case in ("default", "request"):
        inputs = EXPECTED[case]["inputs"]
        done = subprocess.run(
            [
                str(BIN / "flowerpower-daemon"),
                "pipeline",
                "run",
                "hello",
                "--base-dir",
                str(fp_project),
                "--format",
                "json",
                *(["--inputs", json.dumps(inputs)] if inputs else []),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
        )
        assert done.returncode == 0, done.stderr
        message = json.loads(done.stdout)
        assert message["status"] == "success"
        assert message["outputs"] == EXPECTED[case]["outputs"]


def test_params_are_flowerpowers_h_params(projects: ProjectFactory, fp_project: Path) -> None:
    """PARAMS is what FlowerPower 0.37's Config.load gave for the same project, repr for repr."""
    projects.open(str(fp_project)).run("hello")
    assert repr(_pipeline_module("hello").PARAMS) == EXPECTED["h_params_repr"]
    sample = EXPECTED["h_params_sample"]
    assert repr(fpcompat.to_h_params(sample["params"])) == sample["repr"]


BOTH_WAYS = """
from pathlib import Path

from hamilton.function_modifiers import parameterize
from flowerpower.cfg import Config

CFG = Config.load(Path(__file__).parents[1], pipeline_name="both")
PARAMS = CFG.pipeline.h_params


@parameterize(**PARAMS.offset)
def shift(x: float, by: float) -> float:
    return x + by


def scaled(offset: float, factor: float) -> float:
    '''``factor`` reaches this node by argument name.'''
    return offset * factor
"""

BOTH_CONF = {
    "params": {"offset": {"by": 1.5}, "factor": 2, "threshold": "${FP_TEST_THRESHOLD:-3}"},
    "run": {"final_vars": ["offset", "scaled"]},
}


@pytest.mark.parametrize("memory", [False, True], ids=["local", "memory"])
def test_params_reach_nodes_by_name_and_through_params(
    projects: ProjectFactory, memory: bool
) -> None:
    """PARAMS (``@parameterize``) and argument names both work, on local and memory:// projects."""
    project = projects.load(
        {"both": BOTH_WAYS}, {"both": BOTH_CONF}, project={"name": "twoways"}, memory=memory
    )
    assert project.run("both", {"x": 1}) == {"offset": 2.5, "scaled": 5.0}
    cfg = _pipeline_module("both").CFG
    assert cfg.pipeline.params == {"offset": {"by": 1.5}, "factor": 2, "threshold": "3"}
    assert cfg.pipeline.params.threshold == "3"  # ${VAR:-default} expanded, attribute access
    assert cfg.pipeline.params["offset"].by == 1.5
    assert cfg.pipeline.h_params.factor.factor == 2
    assert cfg.pipeline.h_params["offset"]["offset"]["by"].value == 1.5
    assert cfg.pipeline.hamilton_func_params is cfg.pipeline.h_params
    assert cfg.pipeline.run.final_vars == ("offset", "scaled")
    assert cfg.project.name == "twoways"
    assert cfg.project["name"] == "twoways"


OLDER_FORMS = """
from pathlib import Path

from hamilton.function_modifiers import parameterize
from flowerpower import cfg
from flowerpower.cfg import Config

PARAMS = Config.load(base_dir=str(Path(__file__).parents[1]), pipeline_name="old").pipeline.params
FUNC_PARAMS = cfg.load(Path(__file__).parents[1], pipeline_name="old").pipeline.hamilton_func_params


def exceeded(value: float) -> bool:
    return value > PARAMS.limits["high"]


@parameterize(**FUNC_PARAMS.limits)
def limit(high: float, low: float) -> float:
    return high - low
"""


def test_older_template_forms_work(projects: ProjectFactory) -> None:
    """Earlier eras' forms: ``base_dir=``, ``.pipeline.params`` with attribute access,
    ``cfg.load`` and ``hamilton_func_params``."""
    project = projects.load(
        {"old": OLDER_FORMS}, {"old": {"params": {"limits": {"high": 9, "low": 1}}}}
    )
    assert project.run("old", {"value": 10}) == {"exceeded": True, "limits": 8}


def test_config_load_of_another_directory_reads_it(projects: ProjectFactory) -> None:
    """Outside an import, Config.load reads the project with this daemon's loader."""
    base = projects.make({"both": BOTH_WAYS}, {"both": BOTH_CONF})
    cfg = fpcompat.load(base, pipeline_name="both")
    assert cfg.pipeline.name == "both"
    assert cfg.pipeline.params.factor == 2
    assert fpcompat.Config.load(base).pipeline.params == {}
    with pytest.raises(ValueError, match="cfg_dir='config' is not supported"):
        fpcompat.Config.load(base, pipeline_name="both", cfg_dir="config")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false", **env},
    )


FAKE_CFG = """
from types import SimpleNamespace

from hamilton.function_modifiers import value

CALLS = []


class Config:
    @classmethod
    def load(cls, base_dir, pipeline_name=None, **kwargs):
        CALLS.append(pipeline_name)
        h_params = SimpleNamespace(
            greeting={"greeting": {"text": value("Fake"), "punctuation": value("?")}},
            scaled={"scaled": {"factor": value(1)}},
        )
        return SimpleNamespace(pipeline=SimpleNamespace(h_params=h_params))
"""


def test_an_installed_flowerpower_is_never_shadowed(fp_project: Path, tmp_path: Path) -> None:
    """With a ``flowerpower`` package on sys.path, the template module gets that one."""
    fake = tmp_path / "site"
    (fake / "flowerpower").mkdir(parents=True)
    (fake / "flowerpower" / "__init__.py").write_text("")
    (fake / "flowerpower" / "cfg.py").write_text(FAKE_CFG)
    done = _python(
        f"""
        import importlib.machinery, json, sys
        from flowerpower_daemon.project import FlowerPowerProject, fpcompat
        outputs = FlowerPowerProject.load({str(fp_project)!r}).run("hello")
        import flowerpower, flowerpower.cfg
        print(json.dumps({{
            "outputs": outputs,
            "calls": flowerpower.cfg.CALLS,
            "file": flowerpower.cfg.__file__,
            "shim_installed": any(isinstance(f, fpcompat.ShimFinder) for f in sys.meta_path),
            # Behind the finder of installed packages; importlib_metadata's
            # MetadataPathFinder (finds no modules) may append itself after it.
            "shim_last": [
                "shim" if isinstance(f, fpcompat.ShimFinder) else "path" for f in sys.meta_path
                if isinstance(f, fpcompat.ShimFinder) or f is importlib.machinery.PathFinder
            ] == ["path", "shim"],
        }}))
        """,
        PYTHONPATH=str(fake),
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["outputs"]["greeting"] == "Fake, World?"
    assert seen["calls"] == ["hello"]
    assert seen["file"] == str(fake / "flowerpower" / "cfg.py")
    assert seen["shim_installed"] and seen["shim_last"]


def test_importing_the_package_installs_nothing() -> None:
    """No import-time side effect: the finder arrives with the first pipeline module."""
    done = _python(
        """
        import importlib.util, sys
        import flowerpower_daemon, flowerpower_daemon.project
        from flowerpower_daemon.project import fpcompat
        assert not any(isinstance(f, fpcompat.ShimFinder) for f in sys.meta_path)
        assert importlib.util.find_spec("flowerpower") is None
        print("clean")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
