"""Hamilton UI: a daemon run shows up in a real, local Hamilton UI server with its trigger.

The server is apache-hamilton-ui in its local mode (Django on SQLite), the
same thing ``hamilton ui`` starts: ``manage.py migrate`` and ``runserver``
with its ``server.settings_mini`` and a temporary ``HAMILTON_BASE_DIR``. It is
started here directly, on a free loopback port and without Django's
autoreloader (``hamilton ui`` binds 0.0.0.0 and reloads). The test reads the
run back through the REST API the UI's pages use (``/api/v1/dag_runs/...``,
``/api/v1/node_runs/...``), authenticating as the local mode does (an
``x-api-user`` header).

The server comes with the dev install (``apache-hamilton-ui``, also the
``hamilton-ui`` extra). Without it the test skips, except under
``FLOWERPOWER_REQUIRE_SERVICES=1``, where it fails: it installs from PyPI
on every platform the daemon supports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_harness import BIN, configure, make_project, mqtt_trigger, online_daemon, unique
from tests.services import free_port, stop_process

pytestmark = pytest.mark.timeout(300)

USER = "daemon@example.com"

TRACKED = '''\
"""A window of readings and a summary, for the tracker's capture limits."""


def window(readings: list[float]) -> list[float]:
    """The readings as they came (five: more than the list limit)."""
    return list(readings)


def summary(window: list[float]) -> dict:
    """Five keys: more than the dict limit."""
    return {"n": len(window), "total": sum(window), "low": min(window),
            "high": max(window), "first": window[0]}
'''


def _ui_package() -> Path:
    spec = importlib.util.find_spec("hamilton_ui")
    if spec is None or spec.origin is None:
        reason = (
            "apache-hamilton-ui is not installed (the Hamilton UI server): "
            "pip install 'flowerpower-daemon[hamilton-ui]'"
        )
        if os.environ.get("FLOWERPOWER_REQUIRE_SERVICES") == "1":
            pytest.fail(
                reason + " -- it is part of the dev install; FLOWERPOWER_REQUIRE_SERVICES=1"
            )
        pytest.skip(reason)
    return Path(spec.origin).parent


@dataclass
class HamiltonUI:
    """A running local Hamilton UI server and a small client for its REST API."""

    url: str
    log: Path

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"x-api-user": USER, "content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def new_project(self, name: str) -> int:
        """A project ``USER`` may write to (as the UI's "new project" form makes it)."""
        visibility = {
            "user_ids_visible": [],
            "team_ids_visible": [],
            "team_ids_writable": [],
            "user_ids_writable": [USER],
        }
        made = self.call(
            "POST",
            "/api/v1/projects",
            {"name": name, "description": "daemon test", "tags": {}, "visibility": visibility},
        )
        return int(made["id"])

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def hamilton_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HamiltonUI]:
    """The Hamilton UI server on a free loopback port with its own SQLite database."""
    package = _ui_package()
    base = tmp_path_factory.mktemp("hamilton-ui")
    (base / "blobs").mkdir()
    env = {**os.environ, "HAMILTON_BASE_DIR": str(base), "PYTHONPATH": str(package)}
    manage = [sys.executable, str(package / "manage.py")]
    settings = "--settings=server.settings_mini"
    log = base / "server.log"
    with log.open("wb") as out:
        migrated = subprocess.run(
            [*manage, "migrate", settings],
            cwd=package,
            env=env,
            stdout=out,
            stderr=out,
            timeout=240,
        )
    assert migrated.returncode == 0, log.read_text()[-3000:]
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*manage, "runserver", settings, f"127.0.0.1:{port}", "--noreload", "--insecure"],
            cwd=package,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ui = HamiltonUI(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(ui.url + "/api/v0/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Hamilton UI did not start; log:\n{ui.logs()}")
            time.sleep(0.2)
        yield ui
    finally:
        stop_process(proc)


ASYNC_TRACKED = '''\
"""The same on Hamilton's async driver (the SDK's async tracker)."""


async def window(readings: list[float]) -> list[float]:
    """The readings as they came."""
    return list(readings)
'''


def tracked_project(tmp: Path, ui: HamiltonUI, project_ids: dict[str, int]) -> Path:
    """Pipelines ``tracked`` and ``tracked_async``, each tracked in its own UI project."""
    project = make_project(tmp)
    (project / "pipelines" / "tracked.py").write_text(TRACKED)
    (project / "pipelines" / "tracked_async.py").write_text(ASYNC_TRACKED)
    for name, project_id in project_ids.items():
        conf = {
            "run": {"with_adapter": {"hamilton_tracker": True}},
            "adapter": {
                "hamilton_tracker": {
                    "project_id": project_id,
                    "dag_name": f"{name}-dag",
                    "tags": {"site": "plant-1"},
                    "max_list_length_capture": 2,
                    "max_dict_length_capture": 3,
                }
            },
        }
        (project / "conf" / "pipelines" / f"{name}.yml").write_text(yaml.safe_dump(conf))
    # The connection is project-wide, as FlowerPower's conf/project.yml holds it.
    project_yml = project / "conf" / "project.yml"
    data = yaml.safe_load(project_yml.read_text())
    data["adapter"] = {"hamilton_tracker": {"username": USER, "api_url": ui.url, "ui_url": ui.url}}
    project_yml.write_text(yaml.safe_dump(data))
    return project


def wait_for_run(
    ui: HamiltonUI, project_id: int, nodes: set[str], timeout: float = 60
) -> dict[str, Any]:
    """The project's one finished run (the SDK's client logs node results in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = ui.call("GET", f"/api/v1/dag_runs/latest/?project_id={project_id}")
        if runs and runs[0]["run_status"] == "SUCCESS":
            [run] = runs
            node_runs = ui.call("GET", f"/api/v1/dag_runs/{run['id']}")[0]["node_runs"]
            if {n["node_name"] for n in node_runs} >= nodes:
                return dict(run)
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished run in project {project_id}: {runs}\n{ui.logs()}")
        time.sleep(0.3)


def result_summary(ui: HamiltonUI, run_id: int, node: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        [node_run] = ui.call("GET", f"/api/v1/node_runs/by_run_ids/{run_id}?node_name={node}")
        for attribute in node_run["attributes"]:
            if attribute["name"] == "result_summary":
                return attribute["value"]["value"]
        if time.monotonic() > deadline:
            raise AssertionError(f"no result summary of {node}: {node_run}")
        time.sleep(0.3)


async def test_daemon_runs_show_up_in_the_ui_with_their_trigger(
    tmp_path: Path, mosquitto: Any, hamilton_ui: HamiltonUI
) -> None:
    """MQTT-triggered runs (sync and async driver): in their UI project, tagged with the
    trigger, the pipeline's capture limits applied."""
    ids = {name: hamilton_ui.new_project(unique(name)) for name in ("tracked", "tracked_async")}
    project = tracked_project(tmp_path, hamilton_ui, ids)
    prefix = unique("line")
    triggers = [
        mqtt_trigger("line", "tracked", f"{prefix}/readings"),
        mqtt_trigger("line_async", "tracked_async", f"{prefix}/async"),
    ]
    config = configure(tmp_path, mosquitto.port, triggers, project=project)
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(f"{prefix}/readings", b'{"readings": [1, 2, 3, 4, 5]}', qos=1)
        await d.client.publish(f"{prefix}/async", b'{"readings": [7, 8, 9]}', qos=1)
        messages = await d.collect(config.results, 2, timeout=60)
        results = {m.data["pipeline"]: m.data for m in messages}
        assert {r["status"] for r in results.values()} == {"success"}, results
        run = wait_for_run(hamilton_ui, ids["tracked"], {"window", "summary"})
        arun = wait_for_run(hamilton_ui, ids["tracked_async"], {"window"})
        log = d.procs[0].log()
    # The SDK's per-run chatter (two warnings with the run's URL, its clock at INFO)
    # stays out of the daemon's log at its default level.
    for chatter in ("execution run. Results can be found", "Clocked beginning of run"):
        assert chatter not in log, log[-3000:]
    assert run["tags"] == {
        "site": "plant-1",
        "trigger": "line",
        "trigger_type": "mqtt",
        "trigger_topic": f"{prefix}/readings",
        "flowerpower_run_id": results["tracked"]["run_id"],
    }
    assert run["inputs"]["readings"] == [1, 2, 3, 4, 5]
    assert run["username_resolved"] == USER
    # max_list_length_capture: 2 and max_dict_length_capture: 3 (the SDK's defaults: 50, 100)
    assert result_summary(hamilton_ui, run["id"], "window") == [1, 2, "... truncated ..."]
    kept = result_summary(hamilton_ui, run["id"], "summary")
    assert {"n", "total", "low"} <= set(kept)
    assert not {"high", "first"} & set(kept)
    assert arun["tags"]["trigger"] == "line_async"
    assert arun["tags"]["flowerpower_run_id"] == results["tracked_async"]["run_id"]
    assert result_summary(hamilton_ui, arun["id"], "window") == [7, 8, "... truncated ..."]


def _pipeline_run(project: Path, pipeline: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flowerpower-daemon"), "pipeline", "run", pipeline, "--base-dir", str(project)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    return line


def test_an_unreachable_ui_is_named_not_a_graph_that_does_not_build(tmp_path: Path) -> None:
    """No UI at ``api_url``: one line naming the address and the key, where the run used
    to fail with "the Hamilton graph does not build: ConnectionError: ..."."""
    down = HamiltonUI(f"http://127.0.0.1:{free_port()}", tmp_path / "none.log")
    project = tracked_project(tmp_path, down, {"tracked": 1})
    line = _error_line(_pipeline_run(project, "tracked"))
    assert f"the Hamilton UI at {down.url} cannot be reached" in line, line
    assert "adapter.hamilton_tracker.api_url" in line, line
    assert "does not build" not in line, line


def test_a_project_the_ui_does_not_have_is_named(tmp_path: Path, hamilton_ui: HamiltonUI) -> None:
    """A ``project_id`` the UI has no project for (or the user may not use): one line
    naming the key, the id, the user and the UI."""
    project = tracked_project(tmp_path, hamilton_ui, {"tracked": 987654})
    line = _error_line(_pipeline_run(project, "tracked"))
    assert f"the Hamilton UI at {hamilton_ui.url} has no project 987654" in line, line
    assert USER in line and "adapter.hamilton_tracker.project_id" in line, line


def test_a_ui_that_does_not_answer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A UI that accepts connections but never answers: the tracker gives up after
    ``HTTP_TIMEOUT`` with the one-line error (the SDK sets no timeout: it waited forever,
    and held the daemon's start, which builds the drivers, with it)."""
    from flowerpower_daemon.project import uitracker
    from flowerpower_daemon.project.adapters import HamiltonTrackerConfig

    monkeypatch.setattr(uitracker, "HTTP_TIMEOUT", (1.0, 1.0))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connections; nobody reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = HamiltonTrackerConfig(project_id=1, username=USER, api_url=url)
        started = time.monotonic()
        with pytest.raises(uitracker.HamiltonUIError, match=r"cannot be reached \(ReadTimeout\)"):
            uitracker.tracker(settings, "tracked", is_async=False)
    assert time.monotonic() - started < 20
