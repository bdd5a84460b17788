"""How FlowerPower's tracker and MLflow settings reach Hamilton's adapters, run by run.

The real servers are in tests/integration/test_hamilton_ui.py and
test_mlflow.py; here: the run-name placeholders, the trigger tags, the
capture limits reaching the SDK's constants, the per-run MLflow trackers of
one shared driver under concurrent runs, and the one-line errors.
"""

from __future__ import annotations

import contextvars
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import yaml

import flowerpower_daemon.project as project_pkg
from flowerpower_daemon.project import PipelineConfig
from flowerpower_daemon.project.adapters import HamiltonTrackerConfig
from flowerpower_daemon.project.config import validate_model
from flowerpower_daemon.project.models import RunRequest, TriggerInfo
from flowerpower_daemon.project.tracking import (
    bind,
    check_run_name,
    current,
    fill_run_name,
    run_tags,
)

if TYPE_CHECKING:
    from conftest import ProjectFactory

AT = datetime(2026, 12, 6, 22, 42, 5, tzinfo=UTC)
MQTT = TriggerInfo(name="line", type="mqtt", topic="plant/line1", fields={"line": "line1"})


def request(trigger: TriggerInfo = MQTT) -> RunRequest:
    return RunRequest("stats", run_id="ab" * 16, trigger=trigger)


def problems_of(text: str) -> list[str]:
    _, problems = validate_model(
        PipelineConfig, yaml.safe_load(textwrap.dedent(text)), "conf/pipelines/p.yml"
    )
    return [str(p) for p in problems]


# ------------------------------------------------------------------------ run names


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("daily_{timestamp:%Y%m%d_%H%M%S}", "daily_20261206_224205"),
        ("{pipeline_name}-{timestamp}", "stats-20261206T224205Z"),
        ("{pipeline}/{trigger}/{trigger_type}", "stats/line/mqtt"),
        ("run {run_id}", "run " + "ab" * 16),
        ("plain", "plain"),
        ("{{literal}}", "{literal}"),
    ],
)
def test_run_name_placeholders_are_filled_per_run(template: str, expected: str) -> None:
    assert check_run_name(template) is None
    assert fill_run_name(template, "stats", request(), AT) == expected


def test_run_name_without_a_request_is_a_manual_run() -> None:
    assert fill_run_name("{trigger}-{run_id}.", "p", None, AT) == "manual-."


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("r_{when}", "unknown placeholder {when}; known: {pipeline_name}, {pipeline}"),
        ("r_{trigger.name}", "unknown placeholder {trigger.name}"),
        ("r_{", "Single '{' encountered"),
        ("r_{timestamp:%Y}{}", "unknown placeholder {}"),
    ],
)
def test_bad_run_name_is_a_config_problem_at_the_key(template: str, why: str) -> None:
    """The file does not load: the problem names the key and what is wrong."""
    [problem] = problems_of(f"adapter: {{mlflow: {{run_name: '{template}'}}}}")
    assert problem.startswith("conf/pipelines/p.yml: adapter.mlflow.run_name: ")
    assert why in problem


# ------------------------------------------------------------------------ trigger tags


def test_run_tags_name_the_trigger_and_the_run() -> None:
    assert run_tags(request()) == {
        "flowerpower_run_id": "ab" * 16,
        "trigger": "line",
        "trigger_type": "mqtt",
        "trigger_topic": "plant/line1",
    }
    timer = TriggerInfo(name="nightly", type="cron", scheduled="2026-12-06T00:00:00+00:00")
    assert run_tags(request(timer))["trigger_scheduled"] == "2026-12-06T00:00:00+00:00"
    files = TriggerInfo(name="drop", type="file", file_path="/in/a.csv")
    assert run_tags(request(files))["trigger_file"] == "/in/a.csv"
    assert run_tags(None) == {}


def test_bound_request_is_per_context() -> None:
    """A thread started without the runner's context sees no run."""

    def body() -> None:
        bind(request())
        seen: list[RunRequest | None] = []
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join(10)
        assert current() is not None and current().run_id == "ab" * 16  # type: ignore[union-attr]
        assert seen == [None]

    contextvars.copy_context().run(body)


# ------------------------------------------------------------------------ Hamilton UI tracker

uitracker = pytest.importorskip(
    "flowerpower_daemon.project.uitracker", reason="hamilton_sdk not installed"
)


@pytest.fixture
def sdk_constants() -> Iterator[Any]:
    from hamilton_sdk.tracking import constants

    uitracker._patch_constants()
    before = (constants.MAX_LIST_LENGTH_CAPTURE, constants.MAX_DICT_LENGTH_CAPTURE)
    yield constants
    constants.MAX_LIST_LENGTH_CAPTURE, constants.MAX_DICT_LENGTH_CAPTURE = before


def test_capture_keys_map_to_the_sdk_constants() -> None:
    cfg = HamiltonTrackerConfig(
        capture_data_statistics=False, max_list_length_capture=7, max_dict_length_capture=3
    )
    assert uitracker.CaptureLimits.of(cfg) == uitracker.CaptureLimits(False, 7, 3)
    defaults = uitracker.CaptureLimits.of(HamiltonTrackerConfig())
    assert defaults == uitracker.CaptureLimits(True, 50, 10)  # FlowerPower's, not the SDK's 100


def test_sdk_constants_are_the_working_trackers_limits(sdk_constants: Any) -> None:
    """Inside a tracker's result handling its limits apply; elsewhere the process's values."""
    process_value = sdk_constants.MAX_LIST_LENGTH_CAPTURE
    token = uitracker._limits.set(uitracker.CaptureLimits(False, 2, 3))
    try:
        assert sdk_constants.MAX_LIST_LENGTH_CAPTURE == 2
        assert sdk_constants.MAX_DICT_LENGTH_CAPTURE == 3
        assert sdk_constants.CAPTURE_DATA_STATISTICS is False
    finally:
        uitracker._limits.reset(token)
    assert sdk_constants.MAX_LIST_LENGTH_CAPTURE == process_value
    sdk_constants.MAX_LIST_LENGTH_CAPTURE = 9  # set by hand, as the SDK documents
    assert sdk_constants.MAX_LIST_LENGTH_CAPTURE == 9


def test_sdk_truncates_by_the_pipelines_limits(sdk_constants: Any) -> None:
    """The SDK's own list summary, computed under a tracker's limits."""
    from hamilton_sdk.tracking import data_observation

    token = uitracker._limits.set(uitracker.CaptureLimits(True, 2, 3))
    try:
        summary = data_observation.compute_stats([1, 2, 3, 4], "n", {})
    finally:
        uitracker._limits.reset(token)
    assert summary["observability_value"]["value"] == [1, 2, "... truncated ..."]


def test_tracker_tags_are_the_configured_ones_plus_the_runs() -> None:
    tracker = uitracker.DaemonTracker.__new__(uitracker.DaemonTracker)
    tracker.base_tags = {"site": "plant-1", "trigger": "configured"}
    # Outside any run (a fresh context): the configured tags alone.
    outside = contextvars.Context().run(lambda: tracker.base_tags)
    assert outside == {"site": "plant-1", "trigger": "configured"}

    def body() -> None:
        bind(request())
        assert tracker.base_tags == {"site": "plant-1", **run_tags(request())}

    contextvars.copy_context().run(body)


def test_tracker_without_project_id_or_username_names_the_keys(projects: ProjectFactory) -> None:
    module = "def out(x: int) -> int:\n    return x\n"
    project = projects.load(
        {"p": module}, {"p": {"run": {"with_adapter": {"hamilton_tracker": True}}}}
    )
    result = project.execute(project.request("p", {"x": 1}))
    assert result.error is not None
    assert result.error.type == "InputError"
    assert result.error.message == (
        "pipeline 'p': with_adapter.hamilton_tracker needs adapter.hamilton_tracker.project_id"
        " and adapter.hamilton_tracker.username (in conf/project.yml or the pipeline's YAML)"
    )
    assert len(result.attempts) == 1


@pytest.mark.parametrize(
    ("flag", "hidden", "tracker_module", "extra"),
    [
        ("hamilton_tracker", "hamilton_sdk", "uitracker", "tracker"),
        ("mlflow", "mlflow", "mlflowtracker", "mlflow"),
    ],
)
def test_missing_package_names_the_extra(
    projects: ProjectFactory,
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    hidden: str,
    tracker_module: str,
    extra: str,
) -> None:
    """As if the extra were not installed: a one-line error naming it."""
    monkeypatch.setitem(sys.modules, hidden, None)
    monkeypatch.delitem(sys.modules, f"flowerpower_daemon.project.{tracker_module}", raising=False)
    monkeypatch.delattr(project_pkg, tracker_module, raising=False)
    module = "def out(x: int) -> int:\n    return x\n"
    project = projects.load({"p": module})
    result = project.execute(project.request("p", {"x": 1}, with_adapter={flag: True}))
    assert result.error is not None
    assert result.error.type == "DependencyMissingError"
    assert f"pip install 'flowerpower-daemon[{extra}]'" in result.error.message
    assert "\n" not in result.error.message


# ------------------------------------------------------------------------ MLflow


def test_concurrent_runs_of_one_driver_are_separate_mlflow_runs(
    projects: ProjectFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two runs at once on the same driver: two MLflow runs, each with its own outputs and tags."""
    mlflow_client = pytest.importorskip("mlflow.tracking", reason="mlflow not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    module = textwrap.dedent(
        """
        import time

        def doubled(x: float, pause: float = 0.3) -> float:
            time.sleep(pause)
            return 2 * x
        """
    )
    conf = {
        "run": {"with_adapter": {"mlflow": True}},
        "adapter": {"mlflow": {"tracking_uri": store, "run_name": "{trigger}-{run_id}"}},
    }
    project = projects.load({"p": module}, {"p": conf})
    project.run("p", {"x": 0.0, "pause": 0.0})  # builds the driver both runs share
    requests = [
        project.request("p", {"x": float(i)}, trigger=TriggerInfo(name=f"t{i}", type="manual"))
        for i in (1, 2)
    ]
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda r=r: results.__setitem__(r.run_id, project.execute(r)))
        for r in requests
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(result.ok for result in results.values()), results
    client = mlflow_client.MlflowClient(store)
    experiment = client.get_experiment_by_name("p")
    runs = client.search_runs([experiment.experiment_id])
    by_id = {run.data.tags["flowerpower_run_id"]: run for run in runs}
    for i, req in enumerate(requests, start=1):
        run = by_id[req.run_id]
        assert run.info.run_name == f"t{i}-{req.run_id}"
        assert run.data.tags["trigger"] == f"t{i}"
        assert run.data.metrics["doubled"] == 2.0 * i
        assert run.info.status == "FINISHED"


async def test_concurrent_async_runs_are_separate_mlflow_runs(
    projects: ProjectFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Async pipelines: two runs at once on one event loop thread (where MLflow keeps one
    active fluent run) are two finished MLflow runs with their outputs."""
    mlflow_client = pytest.importorskip("mlflow.tracking", reason="mlflow not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    module = textwrap.dedent(
        """
        import asyncio

        async def doubled(x: float) -> float:
            await asyncio.sleep(0.2)
            return 2 * x
        """
    )
    conf = {
        "run": {"with_adapter": {"mlflow": True}},
        "adapter": {"mlflow": {"tracking_uri": store, "experiment_name": "async"}},
    }
    project = projects.load({"a": module}, {"a": conf})
    requests = [project.request("a", {"x": float(i)}) for i in (1, 2)]
    results: dict[str, Any] = {}

    async def one(req: RunRequest) -> None:
        results[req.run_id] = await project.aexecute(req)

    async with anyio.create_task_group() as tg:
        for req in requests:
            tg.start_soon(one, req)
    assert all(result.ok for result in results.values()), results
    client = mlflow_client.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("async").experiment_id])
    by_id = {run.data.tags["flowerpower_run_id"]: run for run in runs}
    assert set(by_id) == set(results)
    for i, req in enumerate(requests, start=1):
        assert by_id[req.run_id].data.metrics["doubled"] == 2.0 * i
        assert by_id[req.run_id].info.status == "FINISHED"
