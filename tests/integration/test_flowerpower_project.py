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

from tests.daemon_harness import (
    base_settings,
    client,
    collect,
    daemon,
    mqtt_trigger,
    wait_online,
    write_config,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "flowerpower037"
EXPECTED = json.loads((FIXTURES / "expected_outputs.json").read_text())

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("variant", ["fresh", "rewritten"])
async def test_flowerpower_made_project_runs_in_the_daemon(
    tmp_path: Path, mosquitto: Any, variant: str
) -> None:
    """Both pipelines of a FlowerPower-made project answer MQTT messages with the outputs
    FlowerPower's own run gave (the template's PARAMS included)."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / variant, project)
    settings = base_settings(project, tmp_path, mosquitto.port)
    tag = settings["mqtt"]["client_id"]
    settings["triggers"] = [
        mqtt_trigger(name, name, f"{tag}/in/{name}", result_topic=f"{tag}/out/{name}")
        for name in ("hello", "plain")
    ]
    with daemon(write_config(tmp_path, settings)) as proc:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/out/#", qos=1)
            for name in ("hello", "plain"):
                await c.publish(f"{tag}/in/{name}", b"{}", qos=1)
            got = {
                msg["pipeline"]: msg for _, msg, _ in await collect(c, f"{tag}/out/#", 2, 60)
            }
    for name in ("hello", "plain"):
        assert got[name]["status"] == "success", got[name]
        assert got[name]["outputs"] == EXPECTED[name], (name, got[name])
    assert "config_key_has_no_effect" not in proc.log()  # FlowerPower's defaults stay silent
