"""The MQTT outbox: on disk, survives reopening, oldest first, bounded (drop oldest, counted)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import pytest

from flowerpower_daemon.mqtt.link import MqttLink
from flowerpower_daemon.mqtt.outbox import Outbox, OutgoingMessage
from flowerpower_daemon.settings import MqttSettings


def _msg(i: int, **kw: Any) -> OutgoingMessage:
    return OutgoingMessage(f"results/{i}", f'{{"i": {i}}}'.encode(), **kw)


async def _all(box: Outbox) -> list[OutgoingMessage]:
    return [m for _, m in await box.peek(1_000_000)]


async def test_put_persists_and_reopen_keeps_messages_with_their_properties(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    full = OutgoingMessage(
        "replies/dev1",
        b"\x00\xffbinary",
        qos=2,
        retain=True,
        correlation_data=b"\x01corr",
        response_topic="replies/back",
        user_properties=(("k", "v"), ("k", "v2"), ("device", "dev1")),
    )
    plain = OutgoingMessage("results/p", b"{}", qos=0)
    async with Outbox(path, max_size=10) as box:
        assert await box.put(full)
        assert await box.put(plain)
        assert len(box) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    async with Outbox(path, max_size=10) as again:
        assert len(again) == 2  # known at open, before anything is read
        assert await _all(again) == [full, plain]


async def test_oldest_first_across_concurrent_puts_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with Outbox(path, max_size=1000) as box:
        for i in range(5):
            assert await box.put(_msg(i))
        # A burst: later callers share one transaction (group commit), order is kept.
        results: list[bool] = []

        async def put(i: int) -> None:
            results.append(await box.put(_msg(i)))

        async with anyio.create_task_group() as tg:
            for i in range(5, 105):
                tg.start_soon(put, i)
        assert results == [True] * 100
    async with Outbox(path, max_size=1000) as box:
        assert [m.topic for m in await _all(box)] == [f"results/{i}" for i in range(105)]


async def test_peek_after_and_remove(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite3", max_size=100) as box:
        for i in range(10):
            await box.put(_msg(i))
        first = await box.peek(3)
        assert [m.topic for _, m in first] == ["results/0", "results/1", "results/2"]
        nxt = await box.peek(3, after=first[-1][0])
        assert [m.topic for _, m in nxt] == ["results/3", "results/4", "results/5"]
        await box.remove([row_id for row_id, _ in first])
        assert len(box) == 7
        await box.remove([first[0][0]])  # already gone: the count stays right
        assert len(box) == 7
        assert (await box.peek(1))[0][1].topic == "results/3"
    async with Outbox(tmp_path / "o.sqlite3", max_size=100) as box:
        assert len(box) == 7


async def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with Outbox(path, max_size=5) as box:
        for i in range(8):
            assert await box.put(_msg(i))
        assert len(box) == 5
        assert box.dropped == 3
        assert [m.topic for m in await _all(box)] == [f"results/{i}" for i in range(3, 8)]
        # A burst bigger than the bound keeps the newest ones.
        async with anyio.create_task_group() as tg:
            for i in range(8, 20):
                tg.start_soon(box.put, _msg(i))
        assert len(box) == 5
        assert box.dropped == 15
        assert [m.topic for m in await _all(box)] == [f"results/{i}" for i in range(15, 20)]
    # A lower bound at the next start drops the oldest of what was kept.
    async with Outbox(path, max_size=2) as box:
        assert len(box) == 2
        assert box.dropped == 3
        assert [m.topic for m in await _all(box)] == ["results/18", "results/19"]


async def test_write_failure_is_counted_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Outbox(tmp_path / "o.sqlite3", max_size=5) as box:
        await box.put(_msg(0))

        def broken() -> sqlite3.Connection:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(box, "_conn", broken)
        async with anyio.create_task_group() as tg:
            for i in range(1, 4):
                tg.start_soon(box.put, _msg(i))
        assert not await box.put(_msg(9))
        assert box.failed == 4
        assert len(box) == 1
        assert await box.peek(10) == []  # reading fails too: logged, nothing returned
        monkeypatch.undo()
        assert [m.topic for m in await _all(box)] == ["results/0"]


async def test_in_memory_outbox_needs_no_open(tmp_path: Path) -> None:
    box = Outbox(None, max_size=2)
    for i in range(3):
        assert await box.put(_msg(i))
    assert len(box) == 2 and box.dropped == 1
    assert [m.topic for m in await _all(box)] == ["results/1", "results/2"]
    await box.aclose()


class _FakeInfo:
    def __init__(self, rc: int) -> None:
        self.rc = rc

    def is_published(self) -> bool:
        return self.rc == 0  # confirmed at once, as paho says of a QoS 0 publish


class _FakePaho:
    """Stands in for the paho client under aiomqtt: records publishes, can fail after
    ``fail_after`` (as paho does without a connection: MQTT_ERR_NO_CONN)."""

    def __init__(self, fail_after: int | None) -> None:
        self.sent: list[tuple[str, bytes, int, bool, Any]] = []
        self.fail_after = fail_after

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, props: Any) -> _FakeInfo:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            return _FakeInfo(4)
        self.sent.append((topic, payload, qos, retain, props))
        return _FakeInfo(0)


class _FakeClient:
    """Stands in for aiomqtt.Client (the parts the link's publish uses)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self._client = _FakePaho(fail_after)
        self._pending_publishes: dict[int, Any] = {}

    @property
    def sent(self) -> list[tuple[str, bytes, int, bool, Any]]:
        return self._client.sent


@contextmanager
def _link(box: Outbox) -> Iterator[MqttLink]:
    """A link that is never run (no broker): only its publish and drain paths are used."""
    link = MqttLink(MqttSettings(url="mqtt://127.0.0.1:1", outbox_size=box.max_size), outbox=box)
    try:
        yield link
    finally:
        link._close_inbox()


async def test_link_queues_on_disk_while_disconnected(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    async with Outbox(path, max_size=10) as box:
        with _link(box) as link:
            assert not await link.publish(_msg(1, correlation_data=b"c"))
            assert not await link.publish(_msg(2))
            assert link.outbox_size == 2
    async with Outbox(path, max_size=10) as box:
        assert await _all(box) == [_msg(1, correlation_data=b"c"), _msg(2)]


async def test_link_connected_publish_does_not_touch_the_outbox(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite3", max_size=10) as box:

        async def no_disk(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the connected path must not use the outbox")

        box.put = no_disk  # type: ignore[method-assign]
        box.peek = no_disk  # type: ignore[method-assign]
        fake = _FakeClient()
        with _link(box) as link:
            link._client = fake  # type: ignore[assignment]
            assert await link.publish(_msg(1, qos=0, retain=True))
        assert fake.sent == [("results/1", b'{"i": 1}', 0, True, None)]


async def test_link_drain_sends_oldest_first_and_keeps_the_rest_on_failure(
    tmp_path: Path,
) -> None:
    async with Outbox(tmp_path / "o.sqlite3", max_size=1000) as box:
        for i in range(450):  # more than one read batch
            await box.put(_msg(i))
        with _link(box) as link:
            failing = _FakeClient(fail_after=300)
            with pytest.raises(aiomqtt.MqttError):
                await link._drain(failing)  # type: ignore[arg-type]
            assert [t for t, *_ in failing.sent] == [f"results/{i}" for i in range(300)]
            assert len(box) == 150
            fake = _FakeClient()
            await link._drain(fake)  # type: ignore[arg-type]
        assert [t for t, *_ in fake.sent] == [f"results/{i}" for i in range(300, 450)]
        assert len(box) == 0
        assert await box.peek(10) == []
