"""Timers after downtime and across daemons: real daemon processes, real Mosquitto and Redis.

1. Stop the daemon across two cron fire times and start it again: ``catch_up:
   none`` runs zero of them, ``latest`` one (the newer), ``all`` both. The cron
   fires in clusters (S, S+5 s, S+10 s, then nothing for 50 s), so the count
   does not depend on how long the restart takes, and no regular fire after the
   restart blurs it; caught-up results say ``trigger.catch_up: true`` and
   ``trigger.scheduled`` names the fire time they are for.
2. Two daemons on one Redis with the same every-second cron and interval
   triggers: each tick runs once (a Redis lock per trigger and fire time), with
   the queue on Redis and with the memory queue and ``shared_state``.
"""

from __future__ import annotations

import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import anyio.to_thread
import orjson
import pytest

from tests.daemon_harness import (
    BIN,
    client,
    collect_for,
    configure,
    make_project,
    online_daemon,
    unique,
)

pytestmark = pytest.mark.timeout(300)

POLICIES = ("none", "latest", "all")
S = timedelta(seconds=1)


def _now() -> datetime:
    return datetime.now(UTC)


async def _sleep_until(when: datetime) -> None:
    await anyio.sleep(max(0.0, (when - _now()).total_seconds()))


def _scheduled(result: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(result["trigger"]["scheduled"])


async def _results_until(
    c: aiomqtt.Client, topic_filter: str, done: Any, timeout: float
) -> list[dict[str, Any]]:
    """Result messages until ``done(results)`` is true or ``timeout`` seconds passed."""
    out: list[dict[str, Any]] = []
    with anyio.move_on_after(timeout):
        async for msg in c.messages:
            if msg.topic.matches(topic_filter):
                out.append(orjson.loads(msg.payload))  # type: ignore[arg-type]
                if done(out):
                    break
    return out


async def collect_for_results(
    c: aiomqtt.Client, topic_filter: str, seconds: float
) -> list[dict[str, Any]]:
    return [r for _, r in await collect_for(c, topic_filter, seconds)]


async def test_restart_across_two_cron_fires_catches_up_per_policy(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Down across two fires: none runs 0 of them, latest 1 (the newer), all 2 (oldest first)."""
    # The cluster starts ~8 s from now, so the first daemon is up for it (else a minute later).
    start = (_now() + 8 * S).replace(microsecond=0)
    seconds = sorted({(start + k * S).second for k in (0, 5, 10)})
    cron = f"{','.join(map(str, seconds))} * * * * *"
    triggers = [
        {"name": f"tick-{p}", "type": "cron", "pipeline": "stats", "cron": cron, "catch_up": p}
        for p in POLICIES
    ]
    config = configure(tmp_path, mosquitto.port, triggers)
    results = config.results

    def cluster_start_seen(rs: list[dict[str, Any]]) -> bool:
        names = {r["trigger"]["name"] for r in rs if _scheduled(r).second == start.second}
        return len(names) == len(POLICIES)

    # Results on one client, the status on the harness's own: waiting for `online` drops no result.
    async with client(mosquitto.port) as c:
        await c.subscribe(results, qos=1)
        async with online_daemon(config, timeout=60) as d:
            first = d.proc
            before = await _results_until(c, results, cluster_start_seen, timeout=80)
            assert cluster_start_seen(before), f"no cluster start fired: {before}\n{first.log()}"
            # Stop before the cluster's second fire (5 s later).
            first.signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(first.wait, 30)
            assert code == 0, first.log()[-3000:]
        before += await collect_for_results(c, results, 0.5)
        last = {
            name: max(_scheduled(r) for r in before if r["trigger"]["name"] == name)
            for name in (f"tick-{p}" for p in POLICIES)
        }
        fired = max(last.values())
        assert fired.second == start.second and set(last.values()) == {fired}, (
            f"the first daemon was still firing after the cluster start: {last}"
        )
        missed = [fired + 5 * S, fired + 10 * S]
        next_regular = fired + 60 * S
        # Restart once both fires have passed; it must be up before the next cluster.
        await _sleep_until(missed[-1] + 0.5 * S)
        async with online_daemon(config, timeout=40) as d:
            second = d.proc
            assert _now() < next_regular - 5 * S, "restart too slow for this test"

            def caught_up(rs: list[dict[str, Any]]) -> bool:
                return sum(1 for r in rs if r["trigger"].get("catch_up")) >= 3

            after = await _results_until(c, results, caught_up, timeout=30)
            # Anything more (a duplicate, a wrong policy) would arrive right behind.
            after += await collect_for_results(c, results, 2.0)
            assert second.proc.poll() is None, second.log()[-3000:]
    assert all(r["status"] == "success" for r in before + after), before + after
    caught: dict[str, list[datetime]] = {
        f"tick-{p}": sorted(
            _scheduled(r)
            for r in after
            if r["trigger"]["name"] == f"tick-{p}" and r["trigger"].get("catch_up")
        )
        for p in POLICIES
    }
    assert caught == {"tick-none": [], "tick-latest": [missed[1]], "tick-all": missed}, after
    # No regular (not caught-up) run for a missed time either: they arrive only from next_regular.
    regular = [r for r in after if not r["trigger"].get("catch_up")]
    assert all(_scheduled(r) >= next_regular for r in regular), regular


@pytest.mark.parametrize("shared", ["redis-queue", "shared-state"])
async def test_two_daemons_on_one_redis_fire_each_tick_once(
    tmp_path: Path, mosquitto: Any, redis_server: Any, shared: str
) -> None:
    """The same every-second cron and 1 s interval on two daemons: one run per tick, with
    the queue on Redis (a worker runs them) and with the memory queue and ``shared_state``
    (each daemon runs the ticks it took), the daemons also sharing an MQTT trigger."""
    project = make_project(tmp_path)
    queue_name = unique("q")
    if shared == "redis-queue":
        extra: dict[str, Any] = {"queue": {"broker": redis_server.url, "queue_name": queue_name}}
    else:
        extra = {"queue": {"queue_name": queue_name}, "shared_state": redis_server.url}
    result_topic = f"{unique('ticks')}/{{pipeline}}"
    triggers = [
        {"name": "cron-tick", "type": "cron", "pipeline": "stats", "cron": "* * * * * *"},
        {"name": "interval-tick", "type": "interval", "pipeline": "stats", "every": "1s"},
        {
            "name": "readings",
            "type": "mqtt",
            "pipeline": "stats",
            "topic": f"{unique('in')}/+",
            "shared_group": "ticks",
        },
    ]
    one, two = (
        configure(
            tmp_path / f"daemon{i}",
            mosquitto.port,
            triggers,
            project=project,
            log_level="DEBUG",
            mqtt={"result_topic": result_topic},
            **extra,
        )
        for i in range(2)
    )
    results = result_topic.format(pipeline="stats")
    workers = 1 if shared == "redis-queue" else 0
    async with client(mosquitto.port) as c:
        await c.subscribe(results, qos=1)
        async with online_daemon(one, two, workers=workers, timeout=60) as d:
            got = await collect_for_results(c, results, 8.0)
            for proc in (*d.workers, *d.procs):
                assert proc.proc.poll() is None, proc.log()[-3000:]
            taken = sum(p.log().count("timer_tick_taken") for p in d.procs)
            status = await anyio.run_process(
                [str(BIN / "flowerpowerctl"), "--socket", str(one.sock), "status"]
            )
    shown = status.stdout.decode()
    if shared == "shared-state":  # status names where the timer state is shared
        assert f"queue      memory  (timers shared in {redis_server.url})" in shown, shown
    else:
        assert "timers shared" not in shown, shown
    runs = Counter((r["trigger"]["name"], r["trigger"]["scheduled"]) for r in got)
    twice = {tick: n for tick, n in runs.items() if n > 1}
    assert not twice, f"ticks run more than once: {twice}"
    per_trigger = Counter(name for name, _ in runs)
    assert per_trigger["cron-tick"] >= 4 and per_trigger["interval-tick"] >= 4, per_trigger
    assert all(r["status"] == "success" for r in got)
    # Both daemons were firing: the one that lost a tick's lock skipped it.
    assert taken >= 3, taken


async def test_ticks_still_fire_when_the_shared_state_redis_is_down(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``shared_state`` pointing at a Redis that does not answer: the daemon starts, fires
    each tick itself and logs ``timer_lock_failed`` (a tick may run on every daemon then,
    rather than on none: README)."""
    result_topic = f"{unique('ticks')}/{{pipeline}}"
    config = configure(
        tmp_path,
        mosquitto.port,
        [{"name": "interval-tick", "type": "interval", "pipeline": "stats", "every": "1s"}],
        shared_state="redis://127.0.0.1:1/0",  # nothing listens there
        mqtt={"result_topic": result_topic},
    )
    results = result_topic.format(pipeline="stats")
    async with client(mosquitto.port) as c:
        await c.subscribe(results, qos=1)
        async with online_daemon(config, timeout=60) as d:
            got = await _results_until(c, results, lambda r: len(r) >= 3, 30)
            log = d.proc.log()
    assert len(got) >= 3 and all(r["status"] == "success" for r in got), got
    assert '"timer_lock_failed"' in log, log[-3000:]
