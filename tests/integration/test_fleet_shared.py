"""Shared subscriptions: daemons with the same triggers and ``shared_group`` split a topic.

Each daemon has its own client id, state dir and result topic
(``<client_id>/results/...``), so the topic a result arrives on says which
daemon answered it. Real Mosquitto (the tests' config), real daemons.
"""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
from daemon_harness import (
    DaemonProcess,
    base_settings,
    client,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)

pytestmark = pytest.mark.timeout(180)

COUNT = 600


def _configs(tmp: Path, port: int, prefix: str, **trigger: Any) -> list[tuple[Path, str]]:
    """Two daemon configs: the same shared trigger, each its own client id and state dir."""
    group = unique("g")
    out = []
    for name in ("a", "b"):
        settings = base_settings(make_project(tmp / name), tmp / name, port)
        settings["max_concurrent_runs"] = 16
        settings["triggers"] = [
            {
                "name": "tagged",
                "type": "mqtt",
                "pipeline": "tagged",
                "topic": f"{prefix}/{{device}}",
                "shared_group": group,
                **trigger,
            }
        ]
        out.append((write_config(tmp / name, settings), settings["mqtt"]["client_id"]))
    return out


class Results:
    """Every result message of both daemons: msg_id -> [(daemon tag, run_id)]."""

    def __init__(self, tags: list[str]) -> None:
        self.tags = tags
        self.by_msg: defaultdict[int, list[tuple[str, str]]] = defaultdict(list)
        self._changed = anyio.Event()  # set (and replaced) at every message

    async def read(self, c: Any, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Every message of ``c``, for the whole test: cancelling an iteration of aiomqtt's
        ``messages`` mid-stream can drop the message being handed over, so it runs once."""
        task_status.started()
        async for msg in c.messages:
            self._add(msg)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_all(self, until: int, timeout: float, proc: DaemonProcess) -> None:
        """Until ``until`` distinct messages are answered, then 1 s more (late duplicates)."""
        try:
            with anyio.fail_after(timeout):
                while len(self.by_msg) < until:
                    await self._changed.wait()
        except TimeoutError:
            missing = sorted(set(range(COUNT)) - set(self.by_msg))[:20]
            raise AssertionError(
                f"{len(self.by_msg)} of {until} answered; missing e.g. {missing}\n"
                f"{proc.log()[-3000:]}"
            ) from None
        await anyio.sleep(1.0)

    def _add(self, msg: Any) -> None:
        tag, _, rest = msg.topic.value.partition("/")
        if tag not in self.tags or not rest.startswith("results/"):
            return
        result = orjson.loads(bytes(msg.payload))
        assert result["status"] == "success", result
        self.by_msg[int(result["outputs"]["msg"])].append((tag, result["run_id"]))

    def answered_by(self, msg_id: int, tag: str) -> bool:
        return any(t == tag for t, _ in self.by_msg.get(msg_id, ()))

    def per_daemon(self) -> Counter[str]:
        return Counter(tag for answers in self.by_msg.values() for tag, _ in answers)


async def _publish(port: int, prefix: str, ids: range, seconds: float = 0.02) -> None:
    async with client(port) as pub:
        for i in ids:
            payload = orjson.dumps({"msg_id": i, "seconds": seconds})
            await pub.publish(f"{prefix}/d{i}", payload, qos=1)


async def test_two_daemons_split_a_shared_topic(tmp_path: Path, mosquitto: Any) -> None:
    """600 QoS 1 messages: each answered exactly once, by one daemon; both answered some."""
    prefix = unique("shared")
    (config_a, tag_a), (config_b, tag_b) = _configs(tmp_path, mosquitto.port, prefix)
    results = Results([tag_a, tag_b])
    with daemon(config_a) as a, daemon(config_b) as b:
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag_a}/status", a)
            await wait_online(c, f"{tag_b}/status", b)
            await c.subscribe(f"{tag_a}/results/#", qos=1)
            await c.subscribe(f"{tag_b}/results/#", qos=1)
            async with anyio.create_task_group() as tg:
                await tg.start(results.read, c)
                await _publish(mosquitto.port, prefix, range(COUNT))
                await results.wait_all(COUNT, 60, a)
                tg.cancel_scope.cancel()
    assert set(results.by_msg) == set(range(COUNT))
    twice = {i: r for i, r in results.by_msg.items() if len(r) != 1}
    assert not twice, twice
    per_daemon = results.per_daemon()
    assert per_daemon[tag_a] > 0 and per_daemon[tag_b] > 0, per_daemon
    assert per_daemon[tag_a] + per_daemon[tag_b] == COUNT


@pytest.mark.parametrize("dedup", [False, True], ids=["no-dedup", "dedup"])
async def test_sigkill_of_one_member_loses_nothing(
    tmp_path: Path, mosquitto: Any, dedup: bool
) -> None:
    """One of two daemons SIGKILLed mid-stream and restarted (same client id, persistent
    session): every message is answered; with dedup_key each ran exactly once."""
    prefix = unique("shared")
    trigger = {"dedup_key": "{device}"} if dedup else {}
    (config_a, tag_a), (config_b, tag_b) = _configs(tmp_path, mosquitto.port, prefix, **trigger)
    results = Results([tag_a, tag_b])
    with daemon(config_a) as a:
        b = DaemonProcess(config_b)
        try:
            async with client(mosquitto.port) as c:
                await wait_online(c, f"{tag_a}/status", a)
                await wait_online(c, f"{tag_b}/status", b)
                await c.subscribe(f"{tag_a}/results/#", qos=1)
                await c.subscribe(f"{tag_b}/results/#", qos=1)
                async with anyio.create_task_group() as tg:
                    await tg.start(results.read, c)
                    # Runs of 0.2 s: b holds runs in flight and messages unacked when killed.
                    await _publish(mosquitto.port, prefix, range(COUNT // 2), 0.2)
                    b.signal(signal.SIGKILL)
                    b.wait(10)
                    await anyio.sleep(0.2)
                    before_kill = results.per_daemon()
                    await _publish(mosquitto.port, prefix, range(COUNT // 2, COUNT), 0.2)
                    b.close()
                    b = DaemonProcess(config_b)  # same client id and state dir
                    await results.wait_all(COUNT, 90, b)
                    tg.cancel_scope.cancel()
        finally:
            b.close()
    assert set(results.by_msg) == set(range(COUNT))
    per_daemon = results.per_daemon()
    assert per_daemon[tag_a] > 0 and per_daemon[tag_b] > 0, per_daemon
    # Published while b was dead: Mosquitto queued b's share for its session, and the
    # restarted b (the same client id) answered them.
    assert before_kill[tag_b] < COUNT // 4, before_kill  # b was killed with work in hand
    late_b = [i for i in range(COUNT // 2, COUNT) if results.answered_by(i, tag_b)]
    assert late_b, per_daemon
    runs = {i: {run_id for _, run_id in r} for i, r in results.by_msg.items()}
    print(
        f"answers: {dict(per_daemon)}; b's before the kill: {before_kill[tag_b]}; published while b was dead and answered by the "
        f"restarted b: {len(late_b)}; messages run more than once: "
        f"{sum(len(r) > 1 for r in runs.values())}"
    )
    if dedup:
        # A redelivered message that had run is not run again (its result is re-sent).
        again = {i: r for i, r in runs.items() if len(r) != 1}
        assert not again, again
