"""Every key FlowerPower writes is accepted: the files of the real FlowerPower 0.37.0
(tests/fixtures/flowerpower037, made by its make_fixtures.sh), the YAML examples of
FlowerPower's 0.11/0.20-era documentation, and each key without effect here warns once per file.
"""

from __future__ import annotations

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
import structlog
import yaml

from flowerpower_daemon.project import FlowerPowerProject, PipelineConfig, ProjectConfig
from flowerpower_daemon.project.config import NO_EFFECT, validate_model, warn_no_effect
from flowerpower_daemon.project.noeffect import _forget_warnings

if TYPE_CHECKING:
    from conftest import ProjectFactory

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "flowerpower037"
EXPECTED = json.loads((FIXTURES / "expected_outputs.json").read_text())
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each test starts as a new process would: no key warned about yet."""
    _forget_warnings()
    yield
    _forget_warnings()


def pipeline(text: str) -> PipelineConfig:
    model, problems = validate_model(
        PipelineConfig, yaml.safe_load(textwrap.dedent(text)) or {}, "conf/pipelines/p.yml"
    )
    assert problems == [], [str(p) for p in problems]
    assert model is not None
    return model


def project_cfg(text: str) -> ProjectConfig:
    model, problems = validate_model(
        ProjectConfig, yaml.safe_load(textwrap.dedent(text)) or {}, "conf/project.yml"
    )
    assert problems == [], [str(p) for p in problems]
    assert model is not None
    return model


def problems_of(text: str) -> list[str]:
    model, problems = validate_model(
        PipelineConfig, yaml.safe_load(textwrap.dedent(text)), "conf/pipelines/p.yml"
    )
    assert model is None
    return [str(p) for p in problems]


def warnings_for(text: str, file: str = "conf/pipelines/p.yml") -> list[dict[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        warn_no_effect(yaml.safe_load(textwrap.dedent(text)), file)
    return [e for e in logs if e["event"] == "config_key_has_no_effect"]


def copy_fixture(tmp_path: Path, which: str) -> Path:
    base = tmp_path / which
    shutil.copytree(FIXTURES / which, base)
    return base


# ------------------------------------------------------------------ FlowerPower 0.37 fixtures


@pytest.mark.parametrize("which", ["fresh", "rewritten"])
def test_flowerpower_037_project_loads_without_problems_or_warnings(
    tmp_path: Path, which: str
) -> None:
    """The project FlowerPower 0.37 made (and the one it rewrote on load) loads whole, silently:
    the defaults it writes ask for nothing this daemon does not do."""
    base = copy_fixture(tmp_path, which)
    with structlog.testing.capture_logs() as logs:
        project = FlowerPowerProject.load(str(base), cache_dir=str(tmp_path / "cache"))
    assert sorted(project.pipelines) == ["hello", "plain"]
    assert project.problems == []
    assert [e for e in logs if e["log_level"] == "warning"] == []
    assert project.name == "realproj"
    assert project.config.hooks_dir == "hooks"
    hello = project.pipelines["hello"]
    assert hello.params == {"greeting": {"message": "Hello from FlowerPower"}}
    assert hello.run.final_vars == ("greeting", "shout")
    assert (hello.run.executor.type, hello.run.executor.max_workers) == ("threadpool", 10)
    assert hello.run.executor.num_cpus == 2
    assert hello.run.retry.max_retries == 3
    assert hello.run.retry_exceptions == ("Exception",)
    assert hello.adapter.ray.ray_init_config == {}  # ``ray_init_config: null``
    plain = project.pipelines["plain"]
    assert plain.run.executor.type == "local"  # ``synchronous``
    assert (plain.run.max_retries, plain.run.retry_exceptions) == (0, ("ValueError",))


@pytest.mark.parametrize("which", ["fresh", "rewritten"])
def test_plain_pipeline_gives_flowerpowers_outputs(tmp_path: Path, which: str) -> None:
    """The pipeline that does not import flowerpower returns what FlowerPower's run returned."""
    base = copy_fixture(tmp_path, which)
    project = FlowerPowerProject.load(str(base), cache_dir=str(tmp_path / "cache"))
    assert project.run("plain") == EXPECTED["plain"]


def test_cli_runs_the_rewritten_project_with_flowerpowers_outputs(tmp_path: Path) -> None:
    """``flowerpower-daemon pipeline run`` on the project FlowerPower rewrote: same outputs."""
    base = copy_fixture(tmp_path, "rewritten")
    args = ["pipeline", "run", "plain", "--base-dir", str(base), "--format", "json"]
    proc = subprocess.run(
        [str(BIN / "flowerpower-daemon"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"] == EXPECTED["plain"]
    assert "warning" not in proc.stderr


# ------------------------------------------------------ the reference documentation's examples

REFERENCE_PROJECT_YML = """
name: my_data_project

job_queue:
  type: rq
  # Detailed RQ/APScheduler settings (e.g., connection, stores)
  # will be covered in the "Configuration" section.
  # For RQ, you might have:
  # redis_host: localhost
  # redis_port: 6379

adapter:
  hamilton_tracker:
    username: user@example.com
    api_url: https://hamilton.example.com/api
    ui_url: https://hamilton.example.com
    api_key: your_secret_api_key
    verify: true
  mlflow:
    tracking_uri: http://localhost:5000
  # opentelemetry:
  #   host: localhost
  #   port: 4317
  # ray:
  #   ray_init_config:
  #     address: 'auto'
  #   shutdown_ray_on_completion: true
"""

REFERENCE_PIPELINE_YML = """
# conf/pipelines/my_data_pipeline.yml

run:
  inputs:
    # No default inputs for this example, expecting them at runtime if needed
  final_vars:
    - "final_output"
    - "transformed_data" # We might want to inspect this intermediate step too
  config:
    data_processing_mode: "strict" # Example Hamilton @config.when key
  cache:
    recompute: ["raw_data"] # Always reload raw_data for this pipeline
  with_adapter:
    hamilton_tracker: true
    mlflow: true
    progressbar: true
    opentelemetry: false
  executor:
    type: local # Default to local execution for this specific pipeline
  log_level: INFO
  max_retries: 2
  retry_delay: 10.0 # seconds
  jitter_factor: 0.2
  retry_exceptions: ["requests.exceptions.ConnectionError", "TransientDatabaseError"]

schedule:
  cron: "0 5 * * *" # Run daily at 5 AM UTC

params:
  data_path: "/mnt/shared_drive/datasets/input_data.csv"
  scale_factor: 3.14
  model_config:
    type: "linear_regression"
    fit_intercept: true
  validation_split: 0.2

adapter:
  hamilton_tracker:
    project_id: 42
    dag_name: "MyDataPipelineDailyRun"
    tags:
      owner: "data_engineering_team"
      priority: "high"
    capture_data_statistics: true
  mlflow:
    experiment_name: "customer_churn_analysis"
    run_name: "daily_prediction_{timestamp:%Y%m%d_%H%M%S}"
    tags:
      version: "1.2.0"
"""

REFERENCE_PARAMS_YML = """
params:
  data_path: "s3://my-production-bucket/latest_data.parquet"
  scale_factor: 1.75
  processing_options:
    filter_threshold: 0.95
    enable_feature_engineering: true
  model_config:
    type: "random_forest"
    estimators: 150
    max_depth: 10
"""


def _uncommented(text: str) -> str:
    """The example with its commented-out settings switched on."""
    return "\n".join(
        line.replace("# ", "", 1) if line.lstrip().startswith("# ") and ":" in line else line
        for line in text.splitlines()
    )


def test_reference_project_yml_loads() -> None:
    """The documentation's ``conf/project.yml`` example validates, with its settings."""
    cfg = project_cfg(REFERENCE_PROJECT_YML)
    assert cfg.name == "my_data_project"
    assert cfg.job_queue.type == "rq"
    assert cfg.adapter.hamilton_tracker.username == "user@example.com"
    assert cfg.adapter.hamilton_tracker.api_url == "https://hamilton.example.com/api"
    assert cfg.adapter.mlflow.tracking_uri == "http://localhost:5000"


def test_reference_project_yml_with_its_comments_switched_on_loads() -> None:
    """Its commented RQ, OpenTelemetry and Ray settings, uncommented, validate too."""
    text = _uncommented(REFERENCE_PROJECT_YML)
    assert "redis_port: 6379" in text
    cfg = project_cfg(text)
    assert (cfg.adapter.opentelemetry.host, cfg.adapter.opentelemetry.port) == ("localhost", 4317)
    assert cfg.adapter.ray.ray_init_config == {"address": "auto"}
    assert cfg.adapter.ray.shutdown_ray_on_completion is True
    keys = {w["key"] for w in warnings_for(text, "conf/project.yml")}
    assert keys == {"job_queue"}  # OpenTelemetry's host and port take effect


def test_reference_pipeline_yml_loads() -> None:
    """The documentation's pipeline example validates with every value it sets."""
    cfg = pipeline(REFERENCE_PIPELINE_YML)
    run = cfg.run
    assert run.inputs == {}
    assert run.final_vars == ("final_output", "transformed_data")
    assert run.config == {"data_processing_mode": "strict"}
    assert (run.cache.enabled, run.cache.recompute) == (True, ("raw_data",))
    assert run.with_adapter.enabled() == ("hamilton_tracker", "mlflow", "progressbar")
    assert (run.executor.type, run.log_level) == ("local", "INFO")
    assert (run.max_retries, run.retry_delay, run.jitter_factor) == (2, 10.0, 0.2)
    assert run.retry_exceptions == (
        "requests.exceptions.ConnectionError",
        "TransientDatabaseError",
    )
    assert cfg.schedule.cron == "0 0 5 * * *"
    assert cfg.params["model_config"] == {"type": "linear_regression", "fit_intercept": True}
    assert cfg.adapter.hamilton_tracker.project_id == 42
    assert cfg.adapter.hamilton_tracker.tags == {
        "owner": "data_engineering_team",
        "priority": "high",
    }
    assert cfg.adapter.mlflow.experiment_name == "customer_churn_analysis"
    assert cfg.adapter.mlflow.tags == {"version": "1.2.0"}
    # Its run name's placeholder is filled in per run (tracking.fill_run_name): no warning.
    assert cfg.adapter.mlflow.run_name == "daily_prediction_{timestamp:%Y%m%d_%H%M%S}"
    assert warnings_for(REFERENCE_PIPELINE_YML) == []


def test_reference_params_example_loads() -> None:
    """The documentation's ``params`` example keeps its nesting."""
    cfg = pipeline(REFERENCE_PARAMS_YML)
    assert cfg.params["processing_options"] == {
        "filter_threshold": 0.95,
        "enable_feature_engineering": True,
    }
    assert cfg.params["model_config"]["estimators"] == 150


def test_reference_pipeline_runs(projects: ProjectFactory) -> None:
    """A pipeline using the documented keys (no adapters switched on) runs with its params."""
    text = REFERENCE_PIPELINE_YML.replace("hamilton_tracker: true", "hamilton_tracker: false")
    text = text.replace("mlflow: true", "mlflow: false").replace("progressbar: true", "x: 1")
    text = text.replace("    x: 1\n", "")
    module = """
        def transformed_data(scale_factor: float, validation_split: float) -> float:
            return scale_factor * validation_split

        def final_output(transformed_data: float, data_path: str) -> str:
            return f"{data_path}:{transformed_data:.3f}"
    """
    project = projects.load({"p": module}, {"p": text})
    out = project.run("p")
    assert out == {
        "final_output": "/mnt/shared_drive/datasets/input_data.csv:0.628",
        "transformed_data": pytest.approx(0.628),
    }


# ---------------------------------------------------------- keys of every FlowerPower era


@pytest.mark.parametrize(
    "text",
    [
        "adapter: {ray: {ray_init_config: null, shutdown_ray_on_completion: false}}",
        "adapter: {mlflow: {experiment_description: null, run_description: null, run_tags: {}}}",
        "adapter: {hamilton_tracker: {dag_name: null, project_id: null, tags: {},"
        " capture_data_statistics: true, max_list_length_capture: 50,"
        " max_dict_length_capture: 10}}",
        "adapter: {tracker: {project_id: 3, dag_name: d, tags: {a: b}}}",
        "adapter: {opentelemetry: {host: localhost, port: 6831}}",
        "run: {adapter: null, pipeline_adapter_cfg: null, project_adapter_cfg: null}",
        "run: {additional_modules: null, on_failure: null, on_success: null, reload: false}",
        "run: {executor: {type: synchronous, max_workers: 10, num_cpus: 2}}",
        "run: {executor: {type: null}}",
        "run: {executor: synchronous}",
        "run: {retry: {jitter_factor: 0.1, max_retries: 3, retry_delay: 1.0,"
        " retry_exceptions: [Exception]}}",
        "run: {with_adapter: {future: false, hamilton_tracker: false, mlflow: false,"
        " progressbar: false, ray: false}}",
        "run: {with_adapter: {tracker: true, opentelemetry: false}}",
        "run: {cache: null, inputs: null, config: null, final_vars: null}",
        "run: {async_driver: null}",
        "schedule: {cron: null, interval: null, date: null}",
        "params: null\nname: p",
    ],
)
def test_flowerpower_keys_are_accepted(text: str) -> None:
    """Each key (and ``null`` value) FlowerPower writes validates."""
    pipeline(text)


@pytest.mark.parametrize(
    "text",
    [
        "name: p\nhooks_dir: hooks",
        "job_queue: {type: rq, backend: {type: redis, host: localhost, port: 6379, database: 0,"
        " queues: [default, high], num_workers: 4, ssl: false}}",
        "job_queue: {type: apscheduler, backend: {data_store: {type: postgresql,"
        " host: localhost, schema: flowerpower}, event_broker: {type: redis, from_ds_sqla: false},"
        " cleanup_interval: 300, max_concurrent_jobs: 10, default_job_executor: threadpool,"
        " num_workers: 2}}",
        "job_queue: {type: huey, backend: {}}",
        "job_queue: null",
        "adapter: {hamilton_tracker: {username: null, api_key: null, verify: false},"
        " mlflow: {tracking_uri: null, registry_uri: null, artifact_location: null},"
        " ray: {ray_init_config: null, shutdown_ray_on_completion: false}}",
        "adapter: {opentelemetry: {host: localhost, port: 6831}}",
        "name: null\nadapter: null",
    ],
)
def test_flowerpower_project_keys_are_accepted(text: str) -> None:
    """Each ``project.yml`` key of every era validates, job queue blocks included."""
    project_cfg(text)


def test_flowerpower_names_map_to_ours() -> None:
    """Keys with an equivalent here do what FlowerPower does with them."""
    cfg = pipeline(
        """
        run:
          executor: {type: synchronous}
          with_adapter: {tracker: true}
        adapter:
          tracker: {project_id: 7}
          mlflow: {run_tags: {team: a, env: x}, tags: {env: prod}}
        """
    )
    assert cfg.run.executor.type == "local"
    assert cfg.run.with_adapter.hamilton_tracker is True
    assert cfg.adapter.hamilton_tracker.project_id == 7
    assert cfg.adapter.mlflow.tags == {"team": "a", "env": "prod"}
    assert warnings_for("run: {executor: synchronous}") == []


def test_run_adapter_cfgs_layer_as_in_flowerpower(projects: ProjectFactory) -> None:
    """project.yml < run.project_adapter_cfg < adapter < run.pipeline_adapter_cfg."""
    project = projects.load(
        {"p": "def out(x: int) -> int:\n    return x\n"},
        {
            "p": """
            adapter:
              mlflow: {experiment_name: from-adapter, run_name: from-adapter}
            run:
              project_adapter_cfg:
                mlflow: {tracking_uri: 'http://run-project', experiment_name: from-run-project}
                ray: {ray_init_config: {num_cpus: 1}}
              pipeline_adapter_cfg:
                mlflow: {run_name: from-run-pipeline}
            """
        },
        project={"name": "x", "adapter": {"mlflow": {"tracking_uri": "http://project"}}},
    )
    adapter = project.pipelines["p"].adapter
    assert adapter.mlflow.tracking_uri == "http://run-project"
    assert adapter.mlflow.experiment_name == "from-adapter"
    assert adapter.mlflow.run_name == "from-run-pipeline"
    assert adapter.ray.ray_init_config == {"num_cpus": 1}


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("adapter: {mlflow: {run_tag: {}}}", "adapter.mlflow.run_tag", "run_tags"),
        ("adapter: {trackr: {}}", "adapter.trackr", "tracker"),
        ("run: {pipeline_adapter_cgf: null}", "run.pipeline_adapter_cgf", "pipeline_adapter_cfg"),
        (
            "run: {pipeline_adapter_cfg: {mlflow: {experiment_nme: x}}}",
            "run.pipeline_adapter_cfg.mlflow.experiment_nme",
            "experiment_name",
        ),
        (
            "run: {retry: {retry_exception: [Exception]}}",
            "run.retry.retry_exception",
            "retry_exceptions",
        ),
        ("run: {executor: {num_cpu: 2}}", "run.executor.num_cpu", "num_cpus"),
    ],
)
def test_keys_flowerpower_never_had_stay_errors(text: str, key: str, suggestion: str) -> None:
    """A typo of a FlowerPower key is still an error with the nearest key."""
    [problem] = problems_of(text)
    assert problem == f"conf/pipelines/p.yml: {key}: unknown key; did you mean {suggestion!r}?"


def test_unknown_executor_type_stays_an_error() -> None:
    """FlowerPower falls back to local for an unknown executor; here it is an error."""
    [problem] = problems_of("run: {executor: {type: synchronus}}")
    assert problem.startswith("conf/pipelines/p.yml: run.executor.type: ")


def test_project_typo_suggests_hooks_dir() -> None:
    """``hooks_dirs`` in project.yml is answered with ``hooks_dir``."""
    model, problems = validate_model(ProjectConfig, {"hooks_dirs": "h"}, "conf/project.yml")
    assert model is None
    assert [str(p) for p in problems] == [
        "conf/project.yml: hooks_dirs: unknown key; did you mean 'hooks_dir'?"
    ]


# ---------------------------------------------------------------- keys without effect warn

#: A value of each NO_EFFECT key that asks for something this daemon does not do.
EFFECTFUL = {
    "hooks_dir": ("hooks_dir: my_hooks", "conf/project.yml"),
    "job_queue": ("job_queue: {type: rq}", "conf/project.yml"),
    "run.with_adapter.ray": ("run: {with_adapter: {ray: true}}", None),
    "run.adapter": ("run: {adapter: {ray_graph_adapter: x}}", None),
    "run.async_driver": ("run: {async_driver: true}", None),
}


def test_every_no_effect_key_is_covered_here() -> None:
    """This file has an example for each entry of the table (and nothing else)."""
    assert set(EFFECTFUL) == {entry.key for entry in NO_EFFECT}


@pytest.mark.parametrize("key", sorted(EFFECTFUL))
def test_key_without_effect_warns_naming_file_key_and_reason(key: str) -> None:
    """A value this daemon would ignore is one warning naming the file, the key and why."""
    text, file = EFFECTFUL[key]
    file = file or "conf/pipelines/p.yml"
    if file == "conf/pipelines/p.yml":
        pipeline(text)
    else:
        project_cfg(text)
    [warning] = warnings_for(text, file)
    [entry] = [e for e in NO_EFFECT if e.key == key]
    assert (warning["key"], warning["file"], warning["reason"]) == (key, file, entry.reason)
    assert warning["log_level"] == "warning"
    assert warning["message"] == f"{file}: {key}: accepted, has no effect here: {entry.reason}"


@pytest.mark.parametrize(
    "text",
    [
        "adapter: {mlflow: {autolog: false, run_name: plain-name, run_description: null}}",
        "adapter: {opentelemetry: {host: null}}",
        "run: {with_adapter: {ray: false}, adapter: null, async_driver: null}",
        "run: {adapter: {}}",
    ],
)
def test_values_that_ask_for_nothing_do_not_warn(text: str) -> None:
    """Defaults and empty values of those keys stay silent."""
    assert warnings_for(text) == []


def test_warning_is_logged_once_per_file_and_key(projects: ProjectFactory) -> None:
    """Two files with the same key, loaded twice: one warning per file (each file is named, so
    the user finds every one to fix), not repeated when the same file is loaded again."""
    module = "def out(x: int) -> int:\n    return x\n"
    asks = {"run": {"async_driver": True}}
    base = projects.make({"a": module, "b": module}, {"a": asks, "b": asks})
    with structlog.testing.capture_logs() as logs:
        FlowerPowerProject.load(base)
        FlowerPowerProject.load(base)
    warned = [e for e in logs if e["event"] == "config_key_has_no_effect"]
    assert sorted((w["key"], Path(w["file"]).name) for w in warned) == [
        ("run.async_driver", "a.yml"),
        ("run.async_driver", "b.yml"),
    ]


def test_cli_prints_each_files_warning_once(tmp_path: Path) -> None:
    """``pipeline run`` on a project whose two files set a key without effect: one stderr line
    for each file."""
    base = copy_fixture(tmp_path, "rewritten")
    for name in ("hello", "plain"):
        conf = base / "conf" / "pipelines" / f"{name}.yml"
        data = yaml.safe_load(conf.read_text())
        data["run"]["async_driver"] = True
        conf.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [str(BIN / "flowerpower-daemon"), "pipeline", "run", "plain", "--base-dir", str(base)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "run.async_driver" in line]
    assert len(lines) == 2, proc.stderr
    for line, name in zip(sorted(lines), ("hello", "plain"), strict=True):
        assert line.startswith("warning: ") and f"{name}.yml: run.async_driver: " in line
        assert "accepted, has no effect here: the driver is chosen from the module" in line


def test_readme_table_mirrors_no_effect() -> None:
    """Each key of the NO_EFFECT table is in the README's table of keys without effect."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("change nothing here", 1)[1].split("This table mirrors", 1)[0]
    for entry in NO_EFFECT:
        last = entry.key.rsplit(".", 1)[-1]
        assert f"`{entry.key}`" in section or f"`.{last}`" in section, entry.key


def test_synchronous_executor_override_runs(tmp_path: Path) -> None:
    """``executor="synchronous"`` given at run time (FlowerPower's name) runs like ``local``."""
    base = copy_fixture(tmp_path, "fresh")
    project = FlowerPowerProject.load(str(base), cache_dir=str(tmp_path / "cache"))
    assert project.run("plain", executor="synchronous") == EXPECTED["plain"]
    assert (
        project.run("plain", executor={"type": "synchronous", "num_cpus": 2}) == (EXPECTED["plain"])
    )
