"""Parsing and validation of ``conf/project.yml`` and ``conf/pipelines/<name>.yml``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.project import FlowerPowerProject, PipelineConfig
from flowerpower_daemon.project.config import RetryPolicy, validate_model

if TYPE_CHECKING:
    from conftest import ProjectFactory

MODULE = """
def out(x: int) -> int:
    return x
"""


def parse(text: str) -> PipelineConfig:
    """Validate one pipeline YAML document, failing the test on any problem."""
    model, problems = validate_model(PipelineConfig, yaml.safe_load(text) or {}, "p.yml")
    assert problems == [], [str(p) for p in problems]
    assert model is not None
    return model


def problems_of(text: str) -> list[str]:
    """The problems one pipeline YAML document has, as the user reads them."""
    model, problems = validate_model(PipelineConfig, yaml.safe_load(text), "conf/pipelines/p.yml")
    assert model is None
    return [str(p) for p in problems]


def test_empty_file_gives_defaults() -> None:
    """An empty pipeline file means no retries, a 5 s retry delay, local executor, no cache."""
    run = parse("").run
    assert run.max_retries == 0
    assert run.retry_delay == 5.0
    assert run.jitter_factor == 0.0
    assert run.retry_backoff == 1.0
    assert run.retry_exceptions == ()
    assert run.executor.type == "local"
    assert run.cache.enabled is False
    assert run.timeout is None
    assert run.final_vars == ()
    assert run.reload is False


def test_every_run_key_is_parsed() -> None:
    """Every documented ``run:`` key reaches the model with its value."""
    run = parse(
        """
        run:
          inputs: {a: 1, b: [1, 2]}
          final_vars: [x, y]
          config: {mode: fast}
          cache: false
          with_adapter: {progressbar: true, future: true, mlflow: false}
          executor: {type: threadpool, max_workers: 4}
          log_level: debug
          max_retries: 3
          retry_delay: 0.5
          retry_backoff: 2
          jitter_factor: 0.25
          retry_exceptions: [ValueError, mypkg.errors.Transient]
          timeout: 30
          additional_modules: [helpers]
          reload: true
          on_success: hooks.notify:ok
          on_failure: hooks.notify.failed
        """
    ).run
    assert run.inputs == {"a": 1, "b": [1, 2]}
    assert run.final_vars == ("x", "y")
    assert run.config == {"mode": "fast"}
    assert run.cache.enabled is False
    assert run.with_adapter.enabled() == ("progressbar", "future")
    assert (run.executor.type, run.executor.max_workers) == ("threadpool", 4)
    assert run.log_level == "DEBUG"
    assert (run.max_retries, run.retry_delay, run.retry_backoff) == (3, 0.5, 2.0)
    assert run.jitter_factor == 0.25
    assert run.retry_exceptions == ("ValueError", "mypkg.errors.Transient")
    assert run.timeout == 30.0
    assert run.additional_modules == ("helpers",)
    assert run.reload is True
    assert (run.on_success, run.on_failure) == ("hooks.notify:ok", "hooks.notify.failed")


def test_executor_string_shorthand() -> None:
    """``executor: threadpool`` is shorthand for ``executor: {type: threadpool}``."""
    run = parse("run: {executor: threadpool}").run
    assert run.executor.type == "threadpool"
    assert run.executor.max_workers is None


@pytest.mark.parametrize(
    ("value", "enabled", "recompute"),
    [
        ("true", True, ()),
        ("false", False, ()),
        ("{recompute: [b, c]}", True, ("b", "c")),
        ("{enabled: false, recompute: [b]}", False, ("b",)),
    ],
)
def test_cache_forms(value: str, enabled: bool, recompute: tuple[str, ...]) -> None:
    """``cache`` is a bool, or a mapping that switches caching on unless it says otherwise."""
    cache = parse(f"run: {{cache: {value}}}").run.cache
    assert cache.enabled is enabled
    assert cache.recompute == recompute


def test_single_strings_become_lists() -> None:
    """A single final var / retry exception / extra module may be given as a plain string."""
    run = parse("run: {final_vars: x, retry_exceptions: OSError, additional_modules: m}").run
    assert run.final_vars == ("x",)
    assert run.retry_exceptions == ("OSError",)
    assert run.additional_modules == ("m",)


def test_nested_retry_block() -> None:
    """``run.retry: {...}`` sets the same retry policy as the flat keys."""
    run = parse(
        """
        run:
          retry:
            max_retries: 4
            retry_delay: 0.1
            jitter_factor: 0.5
            retry_exceptions: [TimeoutError]
        """
    ).run
    assert run.retry == RetryPolicy(
        max_retries=4, retry_delay=0.1, jitter_factor=0.5, retry_exceptions=("TimeoutError",)
    )


def test_flat_retry_keys_win_over_the_retry_block() -> None:
    """When both forms give a key, the flat ``run.max_retries`` wins."""
    run = parse("run: {max_retries: 1, retry: {max_retries: 9, retry_delay: 2}}").run
    assert (run.max_retries, run.retry_delay) == (1, 2.0)


@pytest.mark.parametrize("jitter", [0, 0.5, 1])
def test_jitter_factor_in_range(jitter: float) -> None:
    """A jitter factor from 0 to 1 is accepted."""
    assert parse(f"run: {{jitter_factor: {jitter}}}").run.jitter_factor == jitter


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("run: {jitter_factor: 1.5}", "run.jitter_factor"),
        ("run: {jitter_factor: -0.1}", "run.jitter_factor"),
        ("run: {max_retries: -1}", "run.max_retries"),
        ("run: {timeout: 0}", "run.timeout"),
        ("run: {executor: {type: gpu}}", "run.executor.type"),
        ("run: {log_level: LOUD}", "run.log_level"),
    ],
)
def test_out_of_range_values_name_the_key(text: str, key: str) -> None:
    """A value out of range is reported at its key path."""
    [problem] = problems_of(text)
    assert problem.startswith(f"conf/pipelines/p.yml: {key}: ")


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("run: {max_retry: 3}", "run.max_retry", "max_retries"),
        ("run: {exector: threadpool}", "run.exector", "executor"),
        ("run: {executor: {max_worker: 2}}", "run.executor.max_worker", "max_workers"),
        ("run: {retry: {max_retry: 3}}", "run.retry.max_retry", "max_retries"),
        ("run: {with_adapter: {progresbar: true}}", "run.with_adapter.progresbar", "progressbar"),
        ("run: {cache: {recompte: [a]}}", "run.cache.recompte", "recompute"),
        ("schedule: {interal: 5}", "schedule.interal", "interval"),
        ("paramz: {a: 1}", "paramz", "params"),
        ("adapter: {mlflow: {tracking_url: x}}", "adapter.mlflow.tracking_url", "tracking_uri"),
    ],
)
def test_typo_names_file_key_and_nearest_key(text: str, key: str, suggestion: str) -> None:
    """A misspelt key is an error naming the file, the key path and the nearest valid key."""
    [problem] = problems_of(text)
    assert problem == f"conf/pipelines/p.yml: {key}: unknown key; did you mean {suggestion!r}?"


def test_unknown_key_without_a_near_match_lists_valid_keys() -> None:
    """A key far from every valid key is answered with the list of valid keys."""
    [problem] = problems_of("run: {zzzzzz: 1}")
    assert "run.zzzzzz: unknown key (valid keys: " in problem
    assert "max_retries" in problem


def test_cron_five_and_six_fields() -> None:
    """5-field cron strings get a 0 seconds field; 6-field ones keep their seconds."""
    assert parse("schedule: {cron: '*/5 * * * *'}").schedule.cron == "0 */5 * * * *"
    assert parse("schedule: {cron: '30 */5 * * * *'}").schedule.cron == "30 */5 * * * *"
    assert parse("schedule: {cron: '*/5 * * * *'}").schedule.kind == "cron"


def test_cron_as_fields() -> None:
    """``cron: {minute, hour, day_of_week}`` builds the cron string, missing fields are '*'."""
    schedule = parse('schedule: {cron: {minute: "0", hour: "3", day_of_week: "mon-fri"}}').schedule
    assert schedule.cron == "0 0 3 * * mon-fri"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("2.5", timedelta(seconds=2.5)),
        ("'1h30m'", timedelta(hours=1, minutes=30)),
        ("'250ms'", timedelta(milliseconds=250)),
        ("'1d 2h'", timedelta(days=1, hours=2)),
        ("{hours: 1, minutes: 30}", timedelta(hours=1, minutes=30)),
    ],
)
def test_interval_forms(value: str, expected: timedelta) -> None:
    """An interval is seconds, a unit string such as '1h30m', or a mapping of units."""
    schedule = parse(f"schedule: {{interval: {value}}}").schedule
    assert schedule.interval == expected
    assert schedule.kind == "interval"


def test_date_iso() -> None:
    """An ISO date is parsed; a naive one is taken in the schedule's timezone."""
    schedule = parse("schedule: {date: '2030-01-02T03:04:05'}").schedule
    assert schedule.date == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    berlin = parse("schedule: {date: '2030-07-01T12:00:00', timezone: Europe/Berlin}").schedule
    assert berlin.date is not None
    assert berlin.date.astimezone(UTC) == datetime(2030, 7, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("schedule: {cron: '61 * * * *'}", "schedule.cron", "61 * * * *"),
        ("schedule: {cron: 'every day'}", "schedule.cron", "every day"),
        ("schedule: {cron: {minute: 0, hours: 3}}", "schedule.cron", "hours"),
        ("schedule: {interval: 'soon'}", "schedule.interval", "soon"),
        ("schedule: {interval: '1h30'}", "schedule.interval", "1h30"),
        ("schedule: {interval: -5}", "schedule.interval", "-5"),
        ("schedule: {date: 'tomorrow'}", "schedule.date", "tomorrow"),
        ("schedule: {timezone: 'Mars/Olympus'}", "schedule.timezone", "Mars/Olympus"),
    ],
)
def test_bad_schedule_names_key_and_value(text: str, key: str, value: str) -> None:
    """A bad cron, interval, date or timezone is reported at its key, quoting the value."""
    [problem] = problems_of(text)
    assert problem.startswith(f"conf/pipelines/p.yml: {key}: ")
    assert value in problem


def test_only_one_schedule_kind() -> None:
    """Giving both a cron and an interval is an error that names both."""
    [problem] = problems_of("schedule: {cron: '* * * * *', interval: 5}")
    assert "cron" in problem
    assert "interval" in problem


def test_params_nested() -> None:
    """Params keep their nesting."""
    cfg = parse("params: {model: {lr: 0.1, layers: [8, 4]}, name: x}")
    assert cfg.params == {"model": {"lr": 0.1, "layers": [8, 4]}, "name": "x"}


def test_adapter_sections() -> None:
    """Adapter sections are parsed into their typed settings."""
    cfg = parse(
        """
        adapter:
          hamilton_tracker: {project_id: 7, tags: {env: test}}
          mlflow: {tracking_uri: 'http://mlflow:5000', experiment_name: exp}
          opentelemetry: {port: 4318}
          ray: {ray_init_config: {num_cpus: 2}}
        """
    )
    assert cfg.adapter.hamilton_tracker.project_id == 7
    assert cfg.adapter.hamilton_tracker.tags == {"env": "test"}
    assert cfg.adapter.mlflow.tracking_uri == "http://mlflow:5000"
    assert cfg.adapter.opentelemetry.port == 4318
    assert cfg.adapter.ray.ray_init_config == {"num_cpus": 2}


def test_pipeline_adapter_keys_override_project_keys(projects: ProjectFactory) -> None:
    """A pipeline's adapter keys win; keys it does not set come from project.yml."""
    project = projects.load(
        {"p": MODULE},
        {"p": {"adapter": {"mlflow": {"experiment_name": "mine"}}}},
        project={
            "name": "x",
            "adapter": {"mlflow": {"tracking_uri": "http://a", "experiment_name": "theirs"}},
        },
    )
    mlflow = project.pipelines["p"].adapter.mlflow
    assert (mlflow.tracking_uri, mlflow.experiment_name) == ("http://a", "mine")


def test_env_expansion(projects: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``${VAR}`` takes the environment's value and ``${VAR:-default}`` falls back."""
    monkeypatch.setenv("FP_TEST_RETRIES", "4")
    monkeypatch.delenv("FP_TEST_UNSET", raising=False)
    project = projects.load(
        {"p": MODULE},
        {
            "p": """
            run:
              max_retries: ${FP_TEST_RETRIES}
              inputs:
                url: "http://${FP_TEST_UNSET:-localhost}:1883/x"
            """
        },
    )
    run = project.pipelines["p"].run
    assert run.max_retries == 4
    assert run.inputs["url"] == "http://localhost:1883/x"


def test_unset_env_var_without_default_is_a_problem(
    projects: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset ``${VAR}`` without a default names the file, the key and the variable."""
    monkeypatch.delenv("FP_TEST_UNSET", raising=False)
    base = projects.make({"p": MODULE}, {"p": "params:\n  token: ${FP_TEST_UNSET}\n"})
    project = FlowerPowerProject.load(base)
    with pytest.raises(ConfigError) as info:
        project.run("p")
    [problem] = info.value.problems
    assert problem.file.endswith("conf/pipelines/p.yml")
    assert problem.key == "params.token"
    assert "FP_TEST_UNSET" in problem.message


def test_every_problem_in_every_file_is_reported_at_once(projects: ProjectFactory) -> None:
    """A project.yml problem stops the load; its ConfigError lists the problems of all files."""
    base = projects.make(
        {"a": MODULE, "b": MODULE},
        {
            "a": "run: {max_retry: 2, exector: threadpool}\n",
            "b": "schedule: {cron: '99 * * * *'}\n",
            "orphan": "run: {}\n",
        },
        project="name: x\nadaptr: {}\n",
    )
    with pytest.raises(ConfigError) as info:
        FlowerPowerProject.load(base)
    found = {(p.file.rsplit("/", 1)[-1], p.key) for p in info.value.problems}
    assert found == {
        ("project.yml", "adaptr"),
        ("a.yml", "run.max_retry"),
        ("a.yml", "run.exector"),
        ("b.yml", "schedule.cron"),
        ("orphan.yml", ""),
    }
    message = str(info.value)
    assert message.startswith("5 configuration problem(s):")
    assert "did you mean 'max_retries'?" in message
    assert "did you mean 'executor'?" in message
    assert "'99 * * * *'" in message
    assert "no module pipelines/orphan.py" in message
    assert isinstance(info.value, ValueError)


def test_invalid_yaml_names_line(projects: ProjectFactory) -> None:
    """A YAML syntax error names the file and the line."""
    base = projects.make({"p": MODULE}, {"p": "run:\n  inputs: {a: 1\n"})
    [problem] = FlowerPowerProject.load(base).problems_for("p")
    assert problem.file.endswith("p.yml")
    assert problem.key.startswith("line ")
    assert "invalid YAML" in problem.message


def test_not_a_project(tmp_path: Any) -> None:
    """Loading a directory that is no project says how to create one."""
    with pytest.raises(ConfigError, match="not a FlowerPower project"):
        FlowerPowerProject.load(str(tmp_path))


def test_models_are_frozen() -> None:
    """Validated config cannot be changed by accident."""
    run = parse("run: {max_retries: 1}").run
    with pytest.raises(ValueError, match="frozen"):
        run.max_retries = 2  # type: ignore[misc]
