"""Optional integrations stay unloaded while off: building a pipeline imports no mlflow.

Hamilton loads a plugin for every library it finds installed when its driver
is first imported; its mlflow plugin imports mlflow (~970 modules, ~0.75 s of
every start). ``project/_hamilton.py`` leaves that plugin out; the mlflow
tracker loads it when ``with_adapter.mlflow`` is on. Checked in a fresh
interpreter, since this test process may have imported mlflow already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SENSORS = Path(__file__).resolve().parents[2] / "examples" / "sensors"

PROBE = """
import sys
from flowerpower_daemon.project.api import FlowerPowerProject
project = FlowerPowerProject.load(sys.argv[1])
project.runner.prepare("temperature")
print(sorted(m for m in ("mlflow", "hamilton.plugins.mlflow_extensions",
      "hamilton.plugins.pandas_extensions") if m in sys.modules))
"""


def _fresh_python(code: str, *args: str) -> str:
    """``code`` run by a new interpreter (nothing imported yet), its standard output."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HAMILTON_TELEMETRY_ENABLED": "false", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout


def test_building_a_pipeline_imports_no_mlflow() -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed: nothing would load it anyway")
    out = _fresh_python(PROBE, str(SENSORS))
    # Hamilton's other plugins (pandas here) still load as before.
    assert out.strip().splitlines()[-1] == "['hamilton.plugins.pandas_extensions']"


def test_the_mlflow_tracker_loads_hamiltons_mlflow_plugin() -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed")
    code = (
        "import sys; import flowerpower_daemon.project.mlflowtracker; "
        "print('hamilton.plugins.mlflow_extensions' in sys.modules)"
    )
    out = _fresh_python(code)
    assert out.strip().splitlines()[-1] == "True"
