"""What mqtt/client.py changes in aiomqtt/paho's read and write paths and logging, on a
real Mosquitto.

Publishes go out from the loop's next turn with no writer on the socket (the
writer only when the socket's buffer is full: a burst larger than it still
arrives whole); a burst is read a buffer at a time, not with a few ``recv``
calls per packet, and what was read ahead still arrives when the intake bound
pauses and resumes the socket; paho's per-packet DEBUG lines are skipped
unless its logger takes DEBUG, its warnings are not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest

from flowerpower_daemon.mqtt import client as mqtt
from flowerpower_daemon.mqtt.link import MqttLink
from flowerpower_daemon.settings import MqttSettings

TIMEOUT = 30.0


def _settings(url: str) -> MqttSettings:
    return MqttSettings(url=url, client_id="hooks-test")


async def _received(url: str, topic: str, count: int, send: Any) -> list[bytes]:
    """Subscribe to ``topic``, run ``send()``, return the first ``count`` payloads."""
    got: list[bytes] = []
    reader = mqtt.new_client(
        _settings(url).model_copy(update={"client_id": "hooks-reader"}),
        client_id="hooks-reader",
        receive_maximum=1000,
        will_payload=None,
    )
    reader._client.manual_ack_set(False)
    async with reader:
        await reader.subscribe(topic, qos=1)
        await send()
        with anyio.fail_after(TIMEOUT):
            async for message in reader.messages:
                got.append(bytes(message.payload))  # type: ignore[arg-type]
                if len(got) == count:
                    break
    return got


async def test_publishes_go_out_without_a_writer(mosquitto: Any) -> None:
    loop = asyncio.get_running_loop()
    client = mqtt.new_client(
        _settings(mosquitto.url), client_id="hooks-pub", receive_maximum=10, will_payload=None
    )
    writers: list[int] = []
    add_writer = loop.add_writer

    def counting_add_writer(fd: int, *args: Any) -> None:
        writers.append(fd)
        add_writer(fd, *args)

    inflight: set[asyncio.Future[None]] = set()

    async def send() -> None:
        loop.add_writer = counting_add_writer  # type: ignore[method-assign]
        try:
            for i in range(20):
                await mqtt.publish_raw(client, "hooks/small", b"%d" % i, 1, False, None, inflight)
        finally:
            loop.add_writer = add_writer  # type: ignore[method-assign]

    async with client:
        got = await _received(mosquitto.url, "hooks/small", 20, send)
    assert got == [b"%d" % i for i in range(20)]
    assert writers == []  # every publish went out from call_soon, none waited for a writer


async def test_a_burst_larger_than_the_socket_buffer_arrives_whole(mosquitto: Any) -> None:
    client = mqtt.new_client(
        _settings(mosquitto.url), client_id="hooks-burst", receive_maximum=10, will_payload=None
    )
    payload = b"x" * 200_000
    inflight: set[asyncio.Future[None]] = set()
    loop = asyncio.get_running_loop()
    writers: list[int] = []
    add_writer = loop.add_writer

    def counting_add_writer(fd: int, *args: Any) -> None:
        writers.append(fd)
        add_writer(fd, *args)

    async def send() -> None:
        # Queued in one loop turn: more than a socket buffer holds, so part of it waits
        # for the writer.
        for i in range(30):
            client._client.publish("hooks/big", payload + b"%d" % i, 0)

    async with client:
        loop.add_writer = counting_add_writer  # type: ignore[method-assign]
        try:
            got = await _received(mosquitto.url, "hooks/big", 30, send)
        finally:
            loop.add_writer = add_writer  # type: ignore[method-assign]
        await mqtt.publish_raw(client, "hooks/done", b"", 1, False, None, inflight)
    assert [p[len(payload) :] for p in got] == [b"%d" % i for i in range(30)]
    assert writers  # the socket's buffer filled up: the rest went out through the writer


class _CountingSocket:
    """A socket whose ``recv`` calls are counted (a socket's own methods cannot be patched)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.recvs = 0

    def recv(self, bufsize: int) -> bytes:
        self.recvs += 1
        return bytes(self.sock.recv(bufsize))


async def _burst(url: str, topic: str, count: int) -> None:
    """``count`` small QoS 1 messages, all queued in one loop turn."""
    sender = mqtt.new_client(
        _settings(url).model_copy(update={"client_id": "hooks-burst-sender"}),
        client_id="hooks-burst-sender",
        receive_maximum=count,
        will_payload=None,
    )
    inflight: set[asyncio.Future[None]] = set()
    async with sender:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(
                        mqtt.publish_raw, sender, topic, b"%d" % i, 1, False, None, inflight
                    )


async def test_a_burst_is_read_a_buffer_at_a_time(mosquitto: Any) -> None:
    """paho alone makes four ``recv`` calls per received packet; read ahead, a burst of
    200 messages takes a few, and every message arrives, in order."""
    counting: list[_CountingSocket] = []

    async def send() -> None:
        # The reader's socket, counted from here on (its subscribe is done).
        (reader,) = [c for c in clients if c._client._sock is not None]
        read_ahead = reader._client._sock
        assert isinstance(read_ahead, mqtt._ReadAhead)
        counting.append(_CountingSocket(read_ahead._sock))
        read_ahead._sock = counting[0]  # type: ignore[assignment]
        await _burst(mosquitto.url, "hooks/burst", 200)

    clients: list[Any] = []
    new_client = mqtt.new_client

    def tracked(*args: Any, **kwargs: Any) -> Any:
        client = new_client(*args, **kwargs)
        clients.append(client)
        return client

    mqtt.new_client = tracked  # type: ignore[assignment]
    try:
        got = await _received(mosquitto.url, "hooks/burst", 200, send)
    finally:
        mqtt.new_client = new_client  # type: ignore[assignment]
    assert got == [b"%d" % i for i in range(200)]
    assert 0 < counting[0].recvs < 100, counting[0].recvs  # 800 without reading ahead


async def test_messages_read_ahead_arrive_after_a_pause(mosquitto: Any) -> None:
    """The intake bound pauses the socket with messages already read from the kernel; when
    acks resume it, they are handled at once, not when the next packet (a keepalive's
    PINGRESP, a minute later) makes the socket readable again."""
    settings = _settings(mosquitto.url).model_copy(
        update={"client_id": "hooks-held", "keepalive": 60}
    )
    link = MqttLink(settings, subscriptions=[("hooks/held", 1)], receive_maximum=100, max_held=4)
    got: list[bytes] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(link.run)
            await _burst(mosquitto.url, "hooks/held", 40)  # all of it in one read
            with anyio.fail_after(10):
                async for message in link.messages():
                    got.append(message.payload)
                    await message.ack()
                    if len(got) == 40:
                        break
            pauses = link.pauses
            link.stop()
    assert got == [b"%d" % i for i in range(40)]
    assert pauses >= 1  # the bound did pause the socket with messages read ahead


def test_paho_debug_lines_are_skipped_unless_debug_is_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def make() -> Any:
        return mqtt.new_client(
            _settings("mqtt://127.0.0.1:1"), client_id="x", receive_maximum=1, will_payload=None
        )

    logger = logging.getLogger("mqtt")
    with caplog.at_level(logging.INFO, logger="mqtt"):
        quiet = anyio.run(make)._client
        quiet._easy_log(mqtt.paho_mqtt.MQTT_LOG_DEBUG, "debug %s", "line")
        quiet._easy_log(mqtt.paho_mqtt.MQTT_LOG_WARNING, "warning %s", "line")
    assert [r.getMessage() for r in caplog.records if r.name == "mqtt"] == ["warning line"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mqtt"):
        assert logger.isEnabledFor(logging.DEBUG)
        loud = anyio.run(make)._client
        loud._easy_log(mqtt.paho_mqtt.MQTT_LOG_DEBUG, "debug %s", "line")
    assert [r.getMessage() for r in caplog.records if r.name == "mqtt"] == ["debug line"]
