"""Overlap policies through the real daemon: skip drops, replace cancels, queue serialises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.daemon_harness import configure, online_daemon, unique

pytestmark = pytest.mark.timeout(300)


async def test_overlap_skip_replace_and_queue(tmp_path: Path, mosquitto: Any) -> None:
    """Two quick messages each: skip runs one, replace cancels the first, queue runs both in turn."""
    prefix = unique("ov")
    triggers = [
        {
            "name": policy,
            "type": "mqtt",
            "pipeline": "tagged",
            "topic": f"{prefix}/{policy}",
            "overlap": policy,
            "result_topic": f"{prefix}/out/{policy}",
        }
        for policy in ("skip", "replace", "queue")
    ]
    config = configure(tmp_path, mosquitto.port, triggers)
    async with online_daemon(config, subscribe=[f"{prefix}/out/#"]) as d:
        for policy in ("skip", "replace", "queue"):
            for i in (1, 2):
                body = orjson.dumps({"msg_id": i, "seconds": 1.5})
                await d.client.publish(f"{prefix}/{policy}", body, qos=1)
        got = await d.collect(f"{prefix}/out/#", 5, timeout=60)
        got += [(t, r, None) for t, r in await d.collect_for(f"{prefix}/out/#", 2.0)]
        assert d.proc.proc.poll() is None, d.proc.log()
    by = {
        p: [(r["status"], r["outputs"].get("msg")) for t, r, _ in got if t.endswith(p)]
        for p in ("skip", "replace", "queue")
    }
    assert by["skip"] == [("success", 1)]
    assert sorted(by["replace"]) == [("cancelled", None), ("success", 2)]
    assert by["queue"] == [("success", 1), ("success", 2)]
