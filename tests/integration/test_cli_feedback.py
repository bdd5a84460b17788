"""What a person at a terminal reads from ``flowerpower-daemon``'s project commands and
``check``: keys without effect as plain ``warning:`` lines, one per file and key, and every
problem of a config listed in one ``check`` run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from daemon_harness import BIN

DAEMON = str(BIN / "flowerpower-daemon")
REASON = "the driver is chosen from the module here (async when it has async def nodes)"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAEMON, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
    )


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
