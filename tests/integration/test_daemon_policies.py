"""Overlap policies through the real daemon: skip drops, replace cancels, queue serialises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.daemon_harness import (
    base_settings,
    client,
    collect,
    collect_for,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)

pytestmark = pytest.mark.timeout(300)


async def test_overlap_skip_replace_and_queue(tmp_path: Path, mosquitto: Any) -> None:
    """Two quick messages each: skip runs one, replace cancels the first, queue runs both in turn."""
    prefix = unique("ov")
    s = base_settings(make_project(tmp_path), tmp_path, mosquitto.port)
    s["triggers"] = [
        {"name": policy, "type": "mqtt", "pipeline": "tagged", "topic": f"{prefix}/{policy}",
         "overlap": policy, "result_topic": f"{prefix}/out/{policy}"}
        for policy in ("skip", "replace", "queue")
    ]
    tag = s["mqtt"]["client_id"]
    with daemon(write_config(tmp_path, s)) as proc:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{prefix}/out/#", qos=1)
            for policy in ("skip", "replace", "queue"):
                for i in (1, 2):
                    body = orjson.dumps({"msg_id": i, "seconds": 1.5})
                    await c.publish(f"{prefix}/{policy}", body, qos=1)
            got = await collect(c, f"{prefix}/out/#", 5, timeout=60)
            got += [(t, r, None) for t, r in await collect_for(c, f"{prefix}/out/#", 2.0)]
        assert proc.proc.poll() is None, proc.log()
    by = {p: [(r["status"], r["outputs"].get("msg")) for t, r, _ in got if t.endswith(p)]
          for p in ("skip", "replace", "queue")}
    assert by["skip"] == [("success", 1)]
    assert sorted(by["replace"]) == [("cancelled", None), ("success", 2)]
    assert by["queue"] == [("success", 1), ("success", 2)]
