"""Stopping the daemon: the first SIGTERM lets runs finish, a second cuts them short, and a
stop asked over the control socket is not a first signal. Real daemon, real Mosquitto."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
from control_harness import NO_SYSTEMD, ctl, ok, request
from daemon_harness import (
    Config,
    client,
    collect_for,
    configure,
    mqtt_trigger,
    online_daemon,
    unique,
)

pytestmark = pytest.mark.timeout(120)


def _slow(
    tmp: Path, port: int, shutdown_timeout: float = 60, **options: Any
) -> tuple[Config, str]:
    topic = unique("slow")
    trigger = mqtt_trigger("slow", "slow", f"{topic}/+", **options)
    return configure(tmp, port, [trigger], shutdown_timeout=shutdown_timeout), topic


async def _in_flight(config: Config, count: int) -> None:
    """Until the daemon has ``count`` runs in flight (callers bound it)."""
    while True:
        if request(config.sock, "status")["result"]["in_flight"] >= count:
            return
        await anyio.sleep(0.05)


async def _exit_code(proc: Any, within: float) -> int:
    return int(await anyio.to_thread.run_sync(proc.wait, within))


async def test_a_second_signal_cancels_the_runs_at_once(tmp_path: Path, mosquitto: Any) -> None:
    """Three 20 s runs, shutdown_timeout 60: SIGTERM waits for them, a second SIGTERM ends
    the daemon within seconds, each run's result saying ``cancelled`` (published before the
    links close: the runs are cancelled first, not together with the results' link)."""
    config, topic = _slow(tmp_path, mosquitto.port)
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as d:
        for device in ("a", "b", "c"):
            await d.client.publish(f"{topic}/{device}", orjson.dumps({"seconds": 20}), qos=1)
        with anyio.fail_after(30):
            await _in_flight(config, 3)
        d.proc.signal(signal.SIGTERM)
        await anyio.sleep(1.0)
        assert d.proc.proc.poll() is None, d.proc.log()[-3000:]  # waiting for the run
        d.proc.signal(signal.SIGTERM)
        began = time.monotonic()
        await _exit_code(d.proc, 15)
        assert time.monotonic() - began < 10, d.proc.log()[-3000:]
        assert "second_signal_cancelling_now" in d.proc.log()
        results = [data["status"] for _, data in await d.collect_for(config.results, 1.0)]
        assert results == ["cancelled"] * 3, results  # said, not left unanswered
    log = d.proc.log()
    assert "Exception found while executing" not in log, log[-3000:]  # taskiq's traceback
    async with client(config.port) as c:  # not left `online` for a daemon that is gone
        await c.subscribe(config.status_topic, qos=1)
        [(_, status)] = await collect_for(c, config.status_topic, 1.0)
    assert status["status"] == "offline", status


async def test_a_signal_after_flowerpowerctl_stop_joins_that_stop(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``flowerpowerctl stop`` then SIGTERM (``systemctl stop`` after it): the run in flight
    still finishes and its result goes out; the daemon exits 0. A ``stop --leave`` after the
    plain stop is refused with the reason (the session is kept by then)."""
    config, topic = _slow(tmp_path, mosquitto.port)
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as d:
        await d.client.publish(f"{topic}/x", orjson.dumps({"seconds": 3}), qos=1)
        with anyio.fail_after(30):
            await _in_flight(config, 1)
        shown = ctl(config.sock, "status", as_json=False)
        assert f"as {config.tag}  connected" in shown.out, shown.out  # which daemon this is
        assert ok(config.sock, "stop")["stopping"] is True
        # Too late to leave: a plain stop keeps the session; said, not ignored.
        late = ctl(config.sock, "stop", "--leave", as_json=False)
        assert late.rc == 1, late
        assert "already stopping without --leave" in late.err, late
        d.proc.signal(signal.SIGTERM)
        message = await d.next_message(config.results, timeout=30)
        assert message.data["status"] == "success" and message.data["outputs"]["waited"] == 3
        assert await _exit_code(d.proc, 30) == 0
        log = d.proc.log()
        assert "second_signal_cancelling_now" not in log and '"already_stopping":true' in log


async def test_a_second_signal_during_a_leave_keeps_the_message_for_the_next_start(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``stop --leave`` with a run in flight, then ``systemctl stop`` twice: the run is cut
    short (``cancelled``), but its message is not acked and the session is not ended, so
    the daemon started again with the same client id runs it (what the warning promises),
    its ``dedup_key`` not taken for a duplicate."""
    config, topic = _slow(tmp_path, mosquitto.port, dedup_key="{payload.id}")
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as d:
        await d.client.publish(f"{topic}/x", orjson.dumps({"seconds": 3, "id": "m1"}), qos=1)
        with anyio.fail_after(30):
            await _in_flight(config, 1)
        assert ok(config.sock, "stop", "--leave")["leave"] is True
        d.proc.signal(signal.SIGTERM)  # joins the leave
        await anyio.sleep(0.5)
        d.proc.signal(signal.SIGTERM)  # cuts it short
        await _exit_code(d.proc, 15)
        message = await d.next_message(config.results, timeout=10)
        assert message.data["status"] == "cancelled", message.data
        log = d.proc.log()
        assert "second_signal_cancelling_now" in log
        assert "mqtt_session_ended" not in log and "daemon_left" not in log, log[-3000:]
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as again:
        message = await again.next_message(config.results, timeout=30)
        assert message.data["status"] == "success", message.data
        assert message.data["outputs"]["waited"] == 3


async def test_a_run_past_shutdown_timeout_runs_again_at_the_next_start(
    tmp_path: Path, mosquitto: Any
) -> None:
    """shutdown_timeout 1 and a 4 s run: one SIGTERM ends the daemon after about a second,
    the run's result says ``cancelled``, and its message (unacked) runs at the next start."""
    config, topic = _slow(tmp_path, mosquitto.port, shutdown_timeout=1)
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as d:
        await d.client.publish(f"{topic}/x", orjson.dumps({"seconds": 4}), qos=1)
        with anyio.fail_after(30):
            await _in_flight(config, 1)
        d.proc.signal(signal.SIGTERM)
        assert await _exit_code(d.proc, 15) == 0, d.proc.log()[-3000:]
        message = await d.next_message(config.results, timeout=10)
        assert message.data["status"] == "cancelled", message.data
    async with online_daemon(config, subscribe=[config.results], env=NO_SYSTEMD) as again:
        message = await again.next_message(config.results, timeout=30)
        assert message.data["status"] == "success", message.data
        assert message.data["outputs"]["waited"] == 4
