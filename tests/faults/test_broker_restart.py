"""Broker restarts: real daemon, real Mosquitto (with persistence), real signals.

- Mosquitto restarts in the middle of a stream of 500 QoS 1 messages: the
  daemon reconnects by itself and every message runs exactly once (per
  ``dedup_key``), none missing.
- Results made while the broker is down survive a restart of the daemon
  itself: they wait in the outbox on disk and go out, oldest first, once
  broker and daemon are back.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import anyio.to_thread
import orjson
import pytest

from tests.control_harness import request
from tests.daemon_harness import (
    NODELAY,
    Config,
    configure,
    daemon,
    mqtt_trigger,
    started,
    unique,
    wait_online,
    watcher,
)

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path, port: int, topic: str, qos: int = 1, **extra: Any) -> Config:
    """One MQTT trigger ``tagged`` on ``topic`` (with ``dedup_key`` at QoS 1); quick reconnects."""
    options: dict[str, Any] = {"dedup_key": "{payload.msg_id}"} if qos else {"qos": 0}
    trigger = mqtt_trigger("tagged", "tagged", topic, **options)
    return configure(tmp_path, port, [trigger], mqtt={"reconnect_max": 2.0}, **extra)


async def _results(
    c: aiomqtt.Client,
    topic_filter: str,
    want: set[int],
    seen: Counter[int],
    runs: dict[int, set[str]],
    order: list[int] | None = None,
) -> None:
    """Count success results per msg id (and their run ids) until every id in ``want`` is seen.

    Unbounded: callers bound it.
    """
    if want <= set(seen):
        return
    async for msg in c.messages:
        if not msg.topic.matches(topic_filter):
            continue
        result = orjson.loads(msg.payload)  # type: ignore[arg-type]
        if result["status"] != "success":
            continue
        i = result["outputs"]["msg"]
        seen[i] += 1
        runs.setdefault(i, set()).add(result["run_id"])
        if order is not None:
            order.append(i)
        if want <= set(seen):
            return


async def _poll(
    ok: Callable[[dict[str, Any]], bool],
    status: Callable[[], Awaitable[dict[str, Any]]],
    timeout: float,
) -> dict[str, Any]:
    """Ask the daemon's ``status`` until ``ok`` holds (bounded); returns that status."""
    with anyio.fail_after(timeout):
        while not ok(st := await status()):  # noqa: ASYNC110 - another process's state
            await anyio.sleep(0.05)
    return st


async def test_mosquitto_restart_mid_stream_runs_every_message_once(
    tmp_path: Path, mosquitto: Any
) -> None:
    """500 QoS 1 messages; Mosquitto restarts while ~half are queued or running."""
    topic = unique("stream")
    config = _config(tmp_path, mosquitto.port, topic, max_concurrent_runs=8)
    results = config.results
    n = 500
    half = n // 2
    me = unique("watcher")
    seen: Counter[int] = Counter()
    runs: dict[int, set[str]] = {}
    t0 = time.monotonic()
    # The watcher comes and goes with the broker; the daemon stays up throughout.
    with started(config) as run:
        proc = run.proc
        async with watcher(mosquitto.port, me) as c:
            await wait_online(c, config.status_topic, proc)
            await c.subscribe(results, qos=1)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, socket_options=NODELAY) as p:
                with anyio.fail_after(30):
                    for i in range(half):
                        await p.publish(topic, orjson.dumps({"msg_id": i, "seconds": 0.05}), qos=1)
            # Restart once results flow: runs in flight, messages queued for the daemon.
            with anyio.fail_after(60):
                await _results(c, results, set(range(20)), seen, runs)
        before = len(seen)
        with anyio.fail_after(30):
            await mosquitto.arestart()
        restarted = time.monotonic()
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, socket_options=NODELAY) as p:
            with anyio.fail_after(30):
                for i in range(half, n):
                    await p.publish(topic, orjson.dumps({"msg_id": i, "seconds": 0.05}), qos=1)
        async with watcher(mosquitto.port, me) as c:
            await c.subscribe(results, qos=1)
            with anyio.move_on_after(90):
                await _results(c, results, set(range(n)), seen, runs)
        assert proc.proc.poll() is None, proc.log()[-3000:]
        log = proc.log()
    missing = set(range(n)) - set(seen)
    assert not missing, f"no result for {len(missing)} ids: {sorted(missing)[:20]}; {log[-3000:]}"
    ran_twice = {i: r for i, r in runs.items() if len(r) > 1}
    assert not ran_twice, f"ran more than once: {ran_twice}"
    assert before < n, "the restart came after the stream had finished"
    assert "mqtt_disconnected" in log and log.count('"mqtt_connected"') >= 2
    # Redelivered messages re-publish their earlier result (same run id): report, not fail.
    extra = sum(seen.values()) - n
    print(
        f"results before restart {before}, extra deliveries {extra} "
        f"(redelivered and not run again: {log.count('duplicate_not_run')}), "
        f"total {time.monotonic() - t0:.1f} s, after restart {time.monotonic() - restarted:.1f} s"
    )


async def test_results_made_while_broker_is_down_survive_a_daemon_restart(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Broker down, runs finish (results to the outbox), SIGTERM; then broker + daemon back."""
    topic = unique("offline")
    # QoS 0 and no dedup: nothing is redelivered or re-published, only the outbox can deliver.
    config = _config(tmp_path, mosquitto.port, topic, qos=0, max_concurrent_runs=10)
    results = config.results
    sock = config.sock
    outbox_db = tmp_path / "state" / "outbox.sqlite3"
    n = 5
    me = unique("watcher")

    async def status() -> dict[str, Any]:
        answer = await anyio.to_thread.run_sync(request, sock, "status")
        assert answer["ok"], answer
        return answer["result"]  # type: ignore[no-any-return]

    with started(config) as run:
        first = run.proc
        async with watcher(mosquitto.port, me) as c:
            await wait_online(c, config.status_topic, first)
            await c.subscribe(results, qos=1)
            for i in range(n):
                # Finishing 0.4 s apart, in msg id order, all after the broker is gone.
                body = {"msg_id": i, "seconds": 3.0 + 0.4 * i}
                await c.publish(topic, orjson.dumps(body), qos=1)
            await _poll(lambda st: st["in_flight"] == n, status, timeout=20)
        await mosquitto.astop()
        st = await _poll(
            lambda st: st["mqtt"]["outbox"] == n and not st["in_flight"], status, timeout=30
        )
        assert not st["mqtt"]["connected"]
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
    # On disk, in the state directory, while neither broker nor daemon runs.
    with sqlite3.connect(outbox_db) as db:
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == n
    await mosquitto.astart()
    seen: Counter[int] = Counter()
    runs: dict[int, set[str]] = {}
    order: list[int] = []
    with daemon(config.path) as second:
        async with watcher(mosquitto.port, me) as c:
            await c.subscribe(results, qos=1)
            with anyio.move_on_after(90):
                await _results(c, results, set(range(n)), seen, runs, order)
        assert second.proc.poll() is None, second.log()[-3000:]
        await _poll(lambda st: st["mqtt"]["outbox"] == 0, status, timeout=20)
    assert seen == Counter(range(n)), f"{seen}; log:\n{second.log()[-3000:]}"
    assert order == list(range(n)), "oldest first"
    assert all(len(r) == 1 for r in runs.values())
