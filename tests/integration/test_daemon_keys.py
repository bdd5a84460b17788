"""Per-key policies through the real daemon: one noisy device cannot starve the rest,
and bursts on one key collapse (``coalesce``, ``debounce``)."""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.control_harness import request
from tests.daemon_harness import configure, online_daemon, unique

pytestmark = pytest.mark.timeout(300)


def _keyed(prefix: str, name: str, **policy: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "mqtt",
        "pipeline": "tagged",
        "topic": f"{prefix}/{name}/{{device}}",
        "key": "{device}",
        "result_topic": f"{prefix}/out/{name}/{{device}}",
        **policy,
    }


async def test_per_key_limit_coalesce_and_debounce(tmp_path: Path, mosquitto: Any) -> None:
    """Per key: runs one at a time while other keys go on; coalesce keeps the newest
    waiting message; debounce runs only the last of a burst."""
    prefix = unique("keys")
    triggers = [
        _keyed(prefix, "limited", max_concurrent_per_key=1),
        _keyed(prefix, "coalesced", coalesce=True),
        _keyed(prefix, "debounced", debounce=0.5),
    ]
    config = configure(tmp_path, mosquitto.port, triggers, max_concurrent_runs=8)

    def body(i: int, seconds: float) -> bytes:
        return orjson.dumps({"msg_id": i, "seconds": seconds})

    async with online_daemon(config, subscribe=[f"{prefix}/out/#"]) as d:
        c = d.client
        # limited: three slow runs for the noisy device, one quick for the quiet one
        for i in (1, 2, 3):
            await c.publish(f"{prefix}/limited/noisy", body(i, 0.6), qos=1)
        await c.publish(f"{prefix}/limited/quiet", body(9, 0.0), qos=1)
        # coalesced: 1 runs, 2..4 wait in turn and give way, 5 runs after 1
        for i in (1, 2, 3, 4, 5):
            await c.publish(f"{prefix}/coalesced/dev", body(i, 0.8), qos=1)
        # debounced: a burst of five, then quiet: only the last runs
        for i in (1, 2, 3, 4, 5):
            await c.publish(f"{prefix}/debounced/dev", body(i, 0.0), qos=1)
        got = [(t, r) for t, r, _ in await d.collect(f"{prefix}/out/#", 7, timeout=90)]
        got += await d.collect_for(f"{prefix}/out/#", 2.0)
        assert d.proc.proc.poll() is None, d.proc.log()
        log = d.proc.log()
        status = request(config.sock, "status")["result"]

    def results(name: str, device: str) -> list[dict[str, Any]]:
        return [r for t, r in got if t == f"{prefix}/out/{name}/{device}"]

    noisy = results("limited", "noisy")
    quiet = results("limited", "quiet")
    assert [r["outputs"]["msg"] for r in noisy] == [1, 2, 3]
    assert [r["outputs"]["msg"] for r in quiet] == [9]
    spans = [(_t(r["started_at"]), _t(r["finished_at"])) for r in noisy]
    assert all(a[1] <= b[0] for a, b in pairwise(spans)), spans
    # the quiet device did not wait behind the noisy one's queue
    assert _t(quiet[0]["finished_at"]) < spans[1][0], (quiet, spans)

    assert [r["outputs"]["msg"] for r in results("coalesced", "dev")] == [1, 5]
    assert [r["outputs"]["msg"] for r in results("debounced", "dev")] == [5]
    # 2, 3, 4 gave way in "coalesced"; 1..4 were folded into 5 in "debounced"
    assert log.count('"run_coalesced"') == 7, log[-3000:]
    assert status["counters"]["coalesced"] == 7, status["counters"]


def _t(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)
