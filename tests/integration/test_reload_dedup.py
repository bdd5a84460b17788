"""A trigger that `reload` adds keeps its policies and hooks: dedup_key and mqtt_build_config
work without a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from control_harness import ok, wait_ready
from daemon_harness import configure, mqtt_trigger, online_daemon, unique

pytestmark = pytest.mark.timeout(120)


async def test_reload_added_trigger_dedups(tmp_path: Path, mosquitto: Any) -> None:
    """No trigger had a dedup_key at start; one added by reload still runs a key once."""
    prefix = unique("rd")
    first = mqtt_trigger("plain", "temperature", f"{prefix}/plain/{{device}}")
    config = configure(tmp_path, mosquitto.port, [first])
    async with online_daemon(config, subscribe=[config.results]) as d:
        wait_ready(config.sock, d.proc)
        strict = mqtt_trigger(
            "strict", "temperature", f"{prefix}/strict/{{device}}", dedup_key="{payload.id}"
        )
        settings = {**config.settings, "triggers": [first, strict]}
        config.path.write_text(yaml.safe_dump(settings))
        assert "strict" in ok(config.sock, "reload")["added"]
        answers = []
        for device in ("a", "b"):  # the second after the first's result: a finished key
            await d.client.publish(f"{prefix}/strict/{device}", b'{"temperature": 20, "id": 7}', qos=1)
            answers.append(await d.next_message(config.results, 30))
    first_run, repeat = (m.data for m in answers)
    assert first_run["status"] == "success"
    assert repeat["run_id"] == first_run["run_id"]  # the earlier result again, not a new run
    assert "duplicate_not_run" in d.proc.log()


async def test_reload_added_trigger_gets_its_pipelines_hook(tmp_path: Path, mosquitto: Any) -> None:
    """A trigger that reload adds for a pipeline with an mqtt_build_config hook runs with it."""
    prefix = unique("rh")
    first = mqtt_trigger("plain", "temperature", f"{prefix}/plain/{{device}}")
    config = configure(tmp_path, mosquitto.port, [first])
    async with online_daemon(config, subscribe=[config.results]) as d:
        wait_ready(config.sock, d.proc)
        modal = mqtt_trigger("modal", "modal", f"{prefix}/modal")
        config.path.write_text(yaml.safe_dump({**config.settings, "triggers": [first, modal]}))
        assert "modal" in ok(config.sock, "reload")["added"]
        await d.client.publish(f"{prefix}/modal", b'{"name": "Ab", "mode": "loud"}', qos=1)
        result = (await d.next_message(config.results, 30)).data
    assert result["status"] == "success", result
    assert result["outputs"] == {"greeting": "AB"}  # the hook set mode=loud for this message
