"""MLflow: runs of the daemon and of ``pipeline run`` land in a real MLflow file store.

``with_adapter.mlflow`` goes through Hamilton's ``MLFlowTracker`` (one per run,
:mod:`flowerpower_daemon.project.mlflowtracker`); each test reads the store
back with mlflow's own client: the experiment, the run name with its
placeholders filled, the tags (configured ones and the trigger), the
descriptions and the logged outputs. MLflow 3 keeps its file store behind
``MLFLOW_ALLOW_FILE_STORE=true``, which the processes here get.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_harness import BIN, configure, make_project, mqtt_trigger, online_daemon, unique

pytestmark = pytest.mark.timeout(300)

try:
    import mlflow
    from mlflow.tracking import MlflowClient
except ImportError as exc:  # pragma: no cover - the dev install has it
    if os.environ.get("FLOWERPOWER_REQUIRE_SERVICES") == "1":
        raise
    pytest.skip(
        f"mlflow is not installed ({exc}): pip install 'flowerpower-daemon[mlflow]'",
        allow_module_level=True,
    )

TRACKED = '''\
"""Outputs of each kind the MLflow adapter logs."""


def total(readings: list[float]) -> float:
    """A number: a metric."""
    return sum(readings)


def label(total: float) -> str:
    """Text: label.txt."""
    return f"total={total:g}"


def summary(readings: list[float], total: float) -> dict:
    """A dict: summary.json."""
    return {"n": len(readings), "total": total}
'''

ENV = {"MLFLOW_ALLOW_FILE_STORE": "true", "HAMILTON_TELEMETRY_ENABLED": "false"}


@pytest.fixture(autouse=True)
def _file_store_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    yield


def tracked_project(tmp: Path, store: Path, **mlflow_keys: Any) -> Path:
    """The test project plus pipeline ``tracked`` with MLflow switched on."""
    project = make_project(tmp)
    (project / "pipelines" / "tracked.py").write_text(TRACKED)
    settings = {
        "tracking_uri": store.as_uri(),
        "experiment_name": "daemon-runs",
        "experiment_description": "runs of the sensors project",
        "run_name": "tracked_{trigger}_{timestamp:%Y%m%d}",
        "run_description": "sums the readings",
        "run_tags": {"team": "data"},
        **mlflow_keys,
    }
    conf = {
        "run": {
            "inputs": {"readings": [1.0, 2.0]},
            "final_vars": ["total", "label", "summary"],
            "with_adapter": {"mlflow": True},
        },
        "adapter": {"mlflow": settings},
    }
    (project / "conf" / "pipelines" / "tracked.yml").write_text(yaml.safe_dump(conf))
    return project


def only_run(store: Path, experiment: str = "daemon-runs") -> Any:
    client = MlflowClient(store.as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {store}"
    [run] = client.search_runs([found.experiment_id])
    return run


def artifact_json(store: Path, run_id: str, path: str) -> Any:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=store.as_uri()
    )
    return json.loads(Path(local).read_text())


def test_pipeline_run_logs_named_tagged_run_with_outputs(tmp_path: Path) -> None:
    """``pipeline run``: experiment, run name with placeholders, tags, descriptions, outputs."""
    store = tmp_path / "mlruns"
    project = tracked_project(tmp_path, store)
    proc = subprocess.run(
        [
            *(str(BIN / "flowerpower-daemon"), "pipeline", "run", "tracked"),
            *("--base-dir", str(project), "--inputs", '{"readings": [1.5, 2.5, 4]}'),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "has no effect" not in proc.stderr
    run = only_run(store)
    today = datetime.now(UTC).strftime("%Y%m%d")
    assert run.info.run_name == f"tracked_manual_{today}"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["team"] == "data"
    assert (tags["trigger"], tags["trigger_type"]) == ("manual", "manual")
    assert re.fullmatch(r"[0-9a-f]{32}", tags["flowerpower_run_id"])
    assert tags["mlflow.note.content"] == "sums the readings"
    assert run.data.metrics["total"] == 8.0
    assert run.data.params["readings"] == "[1.5, 2.5, 4]"
    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("daemon-runs")
    assert experiment.tags["mlflow.note.content"] == "runs of the sensors project"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"label.txt", "summary.json", "config.json", "hamilton_graph.json"} <= names
    assert artifact_json(store, run.info.run_id, "summary.json") == {"n": 3, "total": 8.0}
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/label.txt")
    assert text == "total=8"
    # Hamilton's own tracker would have pickled these into the working directory.
    assert not list(tmp_path.glob("*.pickle"))


@pytest.mark.parametrize("queue", ["memory", "redis"])
async def test_daemon_run_carries_the_mqtt_trigger(
    tmp_path: Path, mosquitto: Any, request: pytest.FixtureRequest, queue: str
) -> None:
    """An MQTT-triggered daemon run (in the daemon, or in a worker behind Redis) is an MLflow
    run tagged with its trigger and topic."""
    store = tmp_path / "mlruns"
    project = tracked_project(tmp_path, store, run_name="{pipeline_name}-{trigger_type}")
    topic = f"{unique('batch')}/line1"
    trigger = mqtt_trigger("batches", "tracked", topic)
    extra: dict[str, Any] = {}
    if queue == "redis":
        redis = request.getfixturevalue("redis_server")
        extra["queue"] = {"broker": redis.url, "queue_name": unique("q")}
    config = configure(tmp_path, mosquitto.port, [trigger], project=project, **extra)
    workers = 1 if queue == "redis" else 0
    async with online_daemon(config, subscribe=[config.results], env=ENV, workers=workers) as d:
        await d.client.publish(topic, b'{"readings": [10, 20]}', qos=1)
        _, result, _ = await d.next_message(config.results, timeout=60)
    assert result["status"] == "success", result
    run = only_run(store)
    assert run.info.run_name == "tracked-mqtt"
    tags = run.data.tags
    assert (tags["trigger"], tags["trigger_type"], tags["trigger_topic"]) == (
        "batches",
        "mqtt",
        topic,
    )
    assert tags["flowerpower_run_id"] == result["run_id"]
    assert run.data.metrics["total"] == 30.0


def test_autolog_switches_on_mlflow_autologging(tmp_path: Path) -> None:
    """``autolog: true`` calls ``mlflow.autolog()`` (process-wide) when the driver is built."""
    from mlflow.utils import autologging_utils

    from flowerpower_daemon.project import FlowerPowerProject, mlflowtracker

    store = tmp_path / "mlruns"
    project = FlowerPowerProject.load(
        str(tracked_project(tmp_path, store, autolog=True)), cache_dir=str(tmp_path / "c")
    )
    try:
        out = project.run("tracked")
        assert out["total"] == 3.0
        assert "mlflow" in autologging_utils.AUTOLOGGING_INTEGRATIONS
        assert not autologging_utils.autologging_is_disabled("mlflow")
    finally:
        mlflow.autolog(disable=True)
        mlflowtracker._autolog_on = False
    assert only_run(store).info.status == "FINISHED"


def test_bad_run_name_placeholder_is_a_config_error(tmp_path: Path) -> None:
    """An unknown placeholder in ``run_name`` fails at load, naming the key and the known ones."""
    project = tracked_project(tmp_path, tmp_path / "mlruns", run_name="r_{when}")
    proc = subprocess.run(
        [str(BIN / "flowerpower-daemon"), "pipeline", "run", "tracked", "--base-dir", str(project)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert proc.returncode != 0
    assert "adapter.mlflow.run_name" in proc.stderr
    assert "unknown placeholder {when}" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_tracking_server_that_is_down_does_not_hold_up_the_daemon(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Starting (building the drivers) does not call the tracking server: MLflow's client
    retries one it cannot reach for about four minutes, which held every pipeline's
    triggers back. Untracked pipelines run; the tracked pipeline's run fails with MLflow's
    message (fast here: the test turns MLflow's HTTP retries off, as the README shows)."""
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    down = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    project = tracked_project(tmp_path, tmp_path / "mlruns", tracking_uri=down)
    tracked_topic, plain_topic = f"{unique('tracked')}/a", f"{unique('plain')}/a"
    triggers = [
        mqtt_trigger("tracked", "tracked", tracked_topic),
        mqtt_trigger("temperature", "temperature", plain_topic),
    ]
    config = configure(tmp_path, mosquitto.port, triggers, project=project)
    env = {**ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    async with server, online_daemon(config, subscribe=[config.results], env=env) as d:
        await d.client.publish(plain_topic, b'{"temperature": 20}', qos=1)
        _, plain, _ = await d.next_message(config.results, timeout=30)
        assert connections == 0, "the daemon called the tracking server before any tracked run"
        await d.client.publish(tracked_topic, b'{"readings": [1, 2]}', qos=1)
        _, tracked, _ = await d.next_message(config.results, timeout=30)
    assert plain["status"] == "success", plain
    assert tracked["status"] == "failed", tracked
    assert down in tracked["error"]["message"], tracked
    assert connections >= 1
