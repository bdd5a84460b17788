"""Timers and file events through the real daemon, results on a real Mosquitto."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.daemon_harness import configure, online_daemon, unique

# Each test starts real daemons (subprocesses); generous for a loaded machine.
pytestmark = pytest.mark.timeout(300)


async def test_cron_interval_and_date_fire_on_time(tmp_path: Path, mosquitto: Any) -> None:
    """A 6-field every-second cron and a 1 s interval each fire ~once a second; a date fires once."""
    at = (datetime.now(UTC) + timedelta(seconds=25)).isoformat()
    tag = unique("timers")  # the results of trigger NAME go to TAG/NAME/done
    triggers = [
        {
            "name": "every-second",
            "type": "cron",
            "pipeline": "stats",
            "cron": "* * * * * *",
            "result_topic": f"{tag}/{{trigger}}/done",
        },
        {
            "name": "interval",
            "type": "interval",
            "pipeline": "stats",
            "every": "1s",
            "result_topic": f"{tag}/{{trigger}}/done",
        },
        {
            "name": "once",
            "type": "date",
            "pipeline": "stats",
            "at": at,
            "result_topic": f"{tag}/{{trigger}}/done",
        },
    ]
    config = configure(tmp_path, mosquitto.port, triggers)
    async with online_daemon(config, subscribe=[f"{tag}/+/done"]) as d:
        # Whatever was already published before we were online does not count.
        window = 5.0
        got = await d.collect_for(f"{tag}/+/done", window)
        # The date trigger may be 25 s away from config writing; wait for it, bounded.
        rest = (
            await d.collect(f"{tag}/once/done", 1, timeout=60)
            if not any(t == f"{tag}/once/done" for t, _ in got)
            else []
        )
    counts = {
        name: sum(1 for t, _ in got if t == f"{tag}/{name}/done")
        for name in ("every-second", "interval")
    }
    assert 3 <= counts["every-second"] <= 7, counts
    assert 3 <= counts["interval"] <= 7, counts
    once = [r for t, r in got if t == f"{tag}/once/done"] + [r for _, r, _ in rest]
    assert len(once) == 1
    assert once[0]["trigger"]["type"] == "date"
    assert all(r["status"] == "success" for _, r in got)


async def test_new_file_triggers_exactly_one_run_with_its_path(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A new file matching the glob runs the pipeline once, with file_path and file_event inputs."""
    watched = tmp_path / "incoming"
    watched.mkdir()
    csv = {
        "name": "csv",
        "type": "file",
        "pipeline": "touched",
        "path": str(watched),
        "glob": "*.csv",
    }
    config = configure(tmp_path, mosquitto.port, [csv])
    async with online_daemon(config, subscribe=[config.results]) as d:
        await anyio.sleep(1.0)  # the watcher is armed before `online`; margin for a loaded machine
        (watched / "ignored.txt").write_text("no")
        target = watched / "data.csv"
        target.write_text("a,b\n1,2\n")
        got = await d.collect(config.results, 1, timeout=30)
        more = await d.collect_for(config.results, 2.0)
    [(_, result, _)] = got
    assert result["status"] == "success", result
    assert result["outputs"]["seen"] == f"added:{target}"
    assert result["trigger"]["file_path"] == str(target)
    assert more == []
