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
    BIN,
    DaemonProcess,
    base_settings,
    client,
    collect_for,
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


async def _watch(c: Any, *daemons: tuple[str, DaemonProcess]) -> None:
    """Until each daemon says ``online``; then subscribed to its results."""
    for tag, proc in daemons:
        await wait_online(c, f"{tag}/status", proc)
    for tag, _ in daemons:
        await c.subscribe(f"{tag}/results/#", qos=1)


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
            await _watch(c, (tag_a, a), (tag_b, b))
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
                await _watch(c, (tag_a, a), (tag_b, b))
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


def _session_present(port: int, client_id: str) -> bool:
    """Whether the broker still has a session for ``client_id`` (connects with clean start
    off and a session expiry of 0, so that this look leaves none behind)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    flags: list[bool] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = lambda c, u, f, rc, p: flags.append(bool(f.session_present))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    for _ in range(50):
        c.loop(0.1)
        if flags:
            break
    c.disconnect()
    assert flags, f"no CONNACK for {client_id}"
    return flags[0]


async def test_stop_leave_hands_the_share_to_the_other_daemon(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``flowerpowerctl stop --leave`` on one of two daemons, mid-stream: every message
    published before is answered once, every one published after is answered by the other
    daemon without the one that left coming back (a plain stop leaves its share queued in
    its session: test_shared_inflight.py), and the broker holds no session for it."""
    prefix = unique("shared")
    (config_a, tag_a), (config_b, tag_b) = _configs(tmp_path, mosquitto.port, prefix)
    results = Results([tag_a, tag_b])
    half = COUNT // 2
    with daemon(config_a) as a, daemon(config_b) as b:
        async with client(mosquitto.port) as c:
            await _watch(c, (tag_a, a), (tag_b, b))
            async with anyio.create_task_group() as tg:
                await tg.start(results.read, c)
                # Runs of 0.1 s: b holds messages unacked and queued when told to leave.
                await _publish(mosquitto.port, prefix, range(half), 0.1)
                ctl = await anyio.run_process(
                    [
                        str(BIN / "flowerpowerctl"),
                        "--socket",
                        str(tmp_path / "b" / "state" / "control.sock"),
                        "stop",
                        "--leave",
                    ],
                    check=False,
                )
                assert ctl.returncode == 0, ctl.stderr.decode()
                assert "leave: yes" in ctl.stdout.decode(), ctl.stdout.decode()
                b.signal(signal.SIGTERM)  # `systemctl stop` meanwhile: joins the leave
                code = await anyio.to_thread.run_sync(b.wait, 40)
                assert code == 0, b.log()[-3000:]
                answered_by_b = results.per_daemon()[tag_b]
                await _publish(mosquitto.port, prefix, range(half, COUNT), 0.01)
                await results.wait_all(COUNT, 60, a)
                tg.cancel_scope.cancel()
    assert set(results.by_msg) == set(range(COUNT))
    twice = {i: r for i, r in results.by_msg.items() if len(r) != 1}
    assert not twice, twice
    assert answered_by_b > 0
    assert all(results.answered_by(i, tag_a) for i in range(half, COUNT))
    log_b = b.log()
    assert '"daemon_left"' in log_b and '"mqtt_session_ended"' in log_b, log_b[-3000:]
    assert not _session_present(mosquitto.port, tag_b)
    async with client(mosquitto.port) as c:  # b's retained status is cleared, a's kept
        await c.subscribe("+/status", qos=1)
        retained = dict(await collect_for(c, "+/status", 1.0))
    assert f"{tag_b}/status" not in retained and f"{tag_a}/status" in retained, retained
