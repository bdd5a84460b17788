"""What mqtt/client.py changes in aiomqtt/paho's write path and logging, on a real Mosquitto.

Publishes go out from the loop's next turn with no writer on the socket (the
writer only when the socket's buffer is full: a burst larger than it still
arrives whole); paho's per-packet DEBUG lines are skipped unless its logger
takes DEBUG, its warnings are not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest

from flowerpower_daemon.mqtt import client as mqtt
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
