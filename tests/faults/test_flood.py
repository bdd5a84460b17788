"""A flood of QoS 1 messages against a slow pipeline: the daemon holds a bounded number
of unacked messages (it stops reading its socket past ``5 x max_concurrent_runs``,
whatever the broker sends) and still answers every message exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.control_harness import request
from tests.daemon_harness import configure, mqtt_trigger, online_daemon, unique

pytestmark = pytest.mark.timeout(300)

RUNS = 2  # max_concurrent_runs: the daemon holds at most 5 x this many unacked messages
MESSAGES = 300
N_SLOW = 40


def _tagged(name: str, prefix: str) -> dict[str, Any]:
    """The trigger both floods use: `tagged` runs from <prefix>/in, results to <prefix>/out."""
    return mqtt_trigger(name, "tagged", f"{prefix}/in", result_topic=f"{prefix}/out", qos=1)


async def test_flood_is_held_to_a_bound_and_every_message_answered(
    tmp_path: Path, mosquitto: Any
) -> None:
    prefix = unique("flood")
    config = configure(
        tmp_path,
        mosquitto.port,
        [_tagged("flood", prefix)],
        max_concurrent_runs=RUNS,
        log_level="INFO",
    )
    sock = config.sock
    async with online_daemon(config, subscribe=[f"{prefix}/out"]) as d:
        c = d.client
        seen: Counter[int] = Counter()
        held: list[int] = []

        async def watch() -> None:
            while True:
                status = await anyio.to_thread.run_sync(request, sock, "status")
                held.append(status["result"]["mqtt"]["held"])
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for i in range(MESSAGES):
                body = orjson.dumps({"msg_id": i, "seconds": 0.01})
                await c.publish(f"{prefix}/in", body, qos=1)
            with anyio.fail_after(180):
                async for msg in c.messages:
                    if not msg.topic.matches(f"{prefix}/out"):
                        continue  # the subscriber also has the daemon's status topic
                    seen[orjson.loads(msg.payload)["outputs"]["msg"]] += 1  # type: ignore[arg-type]
                    if len(seen) == MESSAGES:
                        break
            tg.cancel_scope.cancel()
        status = request(sock, "status")["result"]
        assert d.proc.proc.poll() is None, d.proc.log()[-3000:]
        logged = d.proc.log().count('"mqtt_intake_paused"')
    assert sorted(seen) == list(range(MESSAGES))
    assert set(seen.values()) == {1}, [k for k, n in seen.items() if n > 1]
    assert status["mqtt"]["connects"] == 1, status["mqtt"]  # no reconnect was needed
    # A bound of our own, whatever the broker sends (Mosquitto 2.0.11 over-sends past
    # Receive Maximum, so here the socket was paused); one read may overshoot it a little.
    assert held and max(held) <= 5 * RUNS + 8, (max(held), status["mqtt"])
    print(f"[flood] max held {max(held)}, intake pauses {status['mqtt']['intake_pauses']}")
    # Many pauses in one burst, one INFO line (with the count): the others are at DEBUG.
    assert status["mqtt"]["intake_pauses"] > 1 and logged == 1, (status["mqtt"], logged)


async def test_paused_intake_keeps_the_connection_alive_through_slow_runs(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Paused longer than the keepalive (runs slower than it, a backlog waiting): the
    link still reads now and then, so the broker does not drop it and nothing runs twice."""
    prefix = unique("slowflood")
    config = configure(
        tmp_path,
        mosquitto.port,
        [_tagged("slow", prefix)],
        max_concurrent_runs=2,
        mqtt={"keepalive": 5},
    )
    async with online_daemon(config, subscribe=[f"{prefix}/out"]) as d:
        c, proc = d.client, d.proc
        # Quick runs fill the window (the broker over-sends as they are acked), then
        # two 14 s runs take both slots: the intake stays paused longer than keepalive.
        for i in range(N_SLOW):
            seconds = 14.0 if i in (8, 9) else 0.0
            body = orjson.dumps({"msg_id": i, "seconds": seconds})
            await c.publish(f"{prefix}/in", body, qos=1)
        got: list[int] = []
        with anyio.fail_after(90):
            async for msg in c.messages:
                if not msg.topic.matches(f"{prefix}/out"):
                    continue  # the subscriber also has the daemon's status topic
                got.append(orjson.loads(msg.payload)["outputs"]["msg"])  # type: ignore[arg-type]
                if len(got) == N_SLOW:
                    break
        status = request(config.sock, "status")["result"]
        assert proc.proc.poll() is None, proc.log()[-3000:]
    assert sorted(got) == list(range(N_SLOW)), got
    assert status["mqtt"]["intake_pauses"] >= 1, status["mqtt"]
    assert status["mqtt"]["connects"] == 1, (status["mqtt"], proc.log()[-3000:])
