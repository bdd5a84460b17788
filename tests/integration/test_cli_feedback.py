"""What a person at a terminal reads from ``flowerpower-daemon``'s project commands and
``check``: keys without effect as plain ``warning:`` lines, one per file and key, and every
problem of a config listed in one ``check`` run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from daemon_harness import cli

REASON = "the driver is chosen from the module here (async when it has async def nodes)"


def _ask_async_driver(root: Path, name: str) -> Path:
    """Set ``run.async_driver`` (a FlowerPower key without effect here) in ``name``'s YAML."""
    conf = root / "conf" / "pipelines" / f"{name}.yml"
    data = yaml.safe_load(conf.read_text()) or {}
    data.setdefault("run", {})["async_driver"] = True
    conf.write_text(yaml.safe_dump(data))
    return conf


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with pipelines ``a`` and ``b`` from the template."""
    root = tmp_path / "proj"
    assert cli("init", "--base-dir", str(root)).returncode == 0
    for name in ("a", "b"):
        assert cli("pipeline", "new", name, "--base-dir", str(root)).returncode == 0
    return root


def _warning(conf: Path) -> str:
    return f"warning: {conf}: run.async_driver: accepted, has no effect here: {REASON}"


@pytest.mark.parametrize(
    "command",
    [
        ["pipeline", "list"],
        ["pipeline", "show", "a"],
        ["pipeline", "run", "a", "--format", "json"],
    ],
)
def test_no_effect_warning_is_one_plain_line(project: Path, command: list[str]) -> None:
    """Not a JSON log line: the ``warning: <file>: <key>: ...`` line the CLI prints elsewhere."""
    conf = _ask_async_driver(project, "a")
    proc = cli(*command, "--base-dir", str(project))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [_warning(conf)], proc.stderr


def test_check_shows_no_effect_warnings_as_plain_lines(project: Path, tmp_path: Path) -> None:
    conf = _ask_async_driver(project, "a")
    config = tmp_path / "daemon.yml"
    config.write_text(yaml.safe_dump({"project": str(project), "log_level": "WARNING"}))
    proc = cli("check", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [_warning(conf)], proc.stderr


def test_each_file_with_the_key_gets_its_warning(project: Path, tmp_path: Path) -> None:
    """Two pipeline files set the same key: a line for each (both files need the fix)."""
    confs = [_ask_async_driver(project, name) for name in ("a", "b")]
    proc = cli("pipeline", "list", "--base-dir", str(project))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stderr.splitlines()) == [_warning(c) for c in confs], proc.stderr


def _bad_config(tmp_path: Path, project: Path | None) -> Path:
    """Settings that do not validate (a bad MQTT port, a bad cron) and triggers the project
    can still be checked against (an unknown pipeline, a broken pipeline file)."""
    data: dict[str, object] = {
        "mqtt": {"url": "mqtt://127.0.0.1:notaport"},
        "triggers": [
            {"type": "cron", "pipeline": "a", "cron": "bad"},
            {"type": "mqtt", "pipeline": "nope", "topic": "x/y"},
            {"type": "mqtt", "pipeline": "a", "topic": "x/z"},
        ],
    }
    if project is not None:
        data["project"] = str(project)
    config = tmp_path / "daemon.yml"
    config.write_text(yaml.safe_dump(data))
    return config


def _break_pipeline(project: Path) -> None:
    (project / "conf" / "pipelines" / "a.yml").write_text("run:\n  final_varz: [total]\n")


@pytest.mark.parametrize("named", [True, False])
def test_check_lists_settings_and_project_problems_together(
    project: Path, tmp_path: Path, named: bool
) -> None:
    """Bad settings do not hide the project's problems: one run lists both, exit 2 (the
    project named by the config, or the default ``.``)."""
    _break_pipeline(project)
    config = _bad_config(tmp_path, project if named else None)
    proc = cli("check", "-c", str(config), cwd=None if named else project)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: 4 configuration problem(s):"), proc.stderr
    for line in (
        f"{config}: mqtt.url: invalid MQTT url",
        f"{config}: triggers[0].cron: cron expression 'bad' must have 5 or 6 fields",
        f"{config}: triggers[1].pipeline: unknown pipeline 'nope'",
        "conf/pipelines/a.yml: run.final_varz:",
    ):
        assert line in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_still_stops_at_the_settings(project: Path, tmp_path: Path) -> None:
    """``run`` fails fast on the settings alone: their error, no project check, exit 2."""
    _break_pipeline(project)
    proc = cli("run", "-c", str(_bad_config(tmp_path, project)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: 2 configuration problem(s):"), proc.stderr
    assert "final_varz" not in proc.stderr and "nope" not in proc.stderr


def test_check_of_a_file_that_is_not_yaml_names_only_that(tmp_path: Path) -> None:
    """Which project an unparsable file means is unknown: its YAML error alone, not the
    working directory's problems."""
    config = tmp_path / "daemon.yml"
    config.write_text("project: [\n")
    proc = cli("check", "-c", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 1 configuration problem(s):"), proc.stderr
    assert "invalid YAML" in proc.stderr
