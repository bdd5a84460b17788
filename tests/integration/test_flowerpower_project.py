"""Projects made by the real FlowerPower 0.37.0 run unchanged in the daemon.

The fixtures under ``tests/fixtures/flowerpower037/`` were made by FlowerPower
itself (``make_fixtures.sh``): ``fresh`` as ``init`` and its pipeline template
left it, ``rewritten`` after FlowerPower loaded and rewrote its YAML with every
default key. ``expected_outputs.json`` holds what ``PipelineManager.run`` gave.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import configure, mqtt_trigger, online_daemon, unique

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "flowerpower037"
EXPECTED = json.loads((FIXTURES / "expected_outputs.json").read_text())

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("variant", ["fresh", "rewritten"])
async def test_flowerpower_made_project_runs_in_the_daemon(
    tmp_path: Path, mosquitto: Any, variant: str
) -> None:
    """Both pipelines of a FlowerPower-made project answer MQTT messages with the outputs
    FlowerPower's own run gave (the template's PARAMS included)."""
    project = tmp_path / "fp"
    shutil.copytree(FIXTURES / variant, project)
    prefix = unique("fp")
    triggers = [mqtt_trigger(name, name, f"{prefix}/{name}") for name in ("hello", "plain")]
    config = configure(tmp_path, mosquitto.port, triggers, project=project)
    async with online_daemon(config, subscribe=[config.results]) as d:
        for name in ("hello", "plain"):
            await d.client.publish(f"{prefix}/{name}", b"{}", qos=1)
        got = {m.data["pipeline"]: m.data for m in await d.collect(config.results, 2, 60)}
        log = d.proc.log()
    for name in ("hello", "plain"):
        assert got[name]["status"] == "success", got[name]
        assert got[name]["outputs"] == EXPECTED[name], (name, got[name])
    assert "config_key_has_no_effect" not in log  # FlowerPower's defaults stay silent
