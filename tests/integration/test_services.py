"""The real-service fixtures do what a user of the daemon relies on.

A persistent MQTT session keeps QoS 1 messages for an offline subscriber,
also across a broker restart; the recommended broker config is in effect
(no drop at the default 1,000-message queue, no Nagle delay); Redis answers
and keeps data across restart and crash with the AOF on.
"""

from __future__ import annotations

import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import anyio
import pytest
import redis.asyncio as aioredis
from services import (
    DEPLOY_MOSQUITTO_CONF,
    MosquittoService,
    RedisService,
    ServiceStartError,
    find_binary,
    free_port,
    mosquitto_config,
    require_binary,
)

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def client(
    broker: MosquittoService, identifier: str, *, persistent: bool = False
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        clean_session=not persistent,
        socket_options=NODELAY,
        timeout=5,
    )


async def subscribe_persistent(broker: MosquittoService, sub_id: str, topic: str) -> None:
    """Create a persistent session subscribed to ``topic``, then go offline."""
    with anyio.fail_after(5):
        async with client(broker, sub_id, persistent=True) as sub:
            await sub.subscribe(topic, qos=1)


async def publish(
    broker: MosquittoService, topic: str, *payloads: bytes, seconds: float = 10
) -> None:
    """Publish at QoS 1 with a few PUBACKs outstanding at a time (order not kept)."""
    window = anyio.CapacityLimiter(8)  # aiomqtt warns above 10 pending calls

    async def one(pub: aiomqtt.Client, payload: bytes) -> None:
        async with window:
            await pub.publish(topic, payload, qos=1)

    with anyio.fail_after(seconds):
        async with client(broker, unique("pub")) as pub, anyio.create_task_group() as tg:
            for payload in payloads:
                tg.start_soon(one, pub, payload)


async def receive(
    broker: MosquittoService, sub_id: str, count: int, seconds: float = 5
) -> list[aiomqtt.Message]:
    """Reconnect the persistent session and collect ``count`` messages."""
    got: list[aiomqtt.Message] = []
    with anyio.fail_after(seconds):
        async with client(broker, sub_id, persistent=True) as sub:
            async for message in sub.messages:
                got.append(message)
                if len(got) == count:
                    break
    return got


# ------------------------------------------------------------------- mqtt


async def test_queued_qos1_message_reaches_reconnecting_subscriber(
    mosquitto_session: MosquittoService,
) -> None:
    topic, sub_id = unique("fp-test/offline"), unique("sub")
    await subscribe_persistent(mosquitto_session, sub_id, topic)

    await publish(mosquitto_session, topic, b"while-offline")

    [message] = await receive(mosquitto_session, sub_id, 1)
    assert message.topic.value == topic
    assert message.payload == b"while-offline"
    assert message.qos == 1


async def test_session_and_queued_message_survive_broker_restart(
    mosquitto: MosquittoService,
) -> None:
    topic, sub_id = unique("fp-test/restart"), unique("sub")
    await subscribe_persistent(mosquitto, sub_id, topic)
    port, url = mosquitto.port, mosquitto.url

    # The subscription is persisted...
    await mosquitto.arestart()
    await publish(mosquitto, topic, b"after-first-restart")
    # ...and so is the message queued for the offline session.
    await mosquitto.arestart()

    assert (mosquitto.port, mosquitto.url) == (port, url)
    assert mosquitto.starts == 3
    [message] = await receive(mosquitto, sub_id, 1)
    assert message.payload == b"after-first-restart"
    assert message.qos == 1


async def test_broker_keeps_more_than_default_1000_queued_messages(
    mosquitto_session: MosquittoService,
) -> None:
    # Mosquitto's default max_queued_messages (1000) silently drops the rest
    # for an offline subscriber; the recommended config keeps them all.
    n = 1200
    topic, sub_id = unique("fp-test/backlog"), unique("sub")
    await subscribe_persistent(mosquitto_session, sub_id, topic)

    await publish(mosquitto_session, topic, *(str(i).encode() for i in range(n)), seconds=30)

    got = await receive(mosquitto_session, sub_id, n, seconds=30)
    assert Counter(m.payload for m in got) == Counter(str(i).encode() for i in range(n))


async def test_request_reply_round_trip_has_no_nagle_delay(
    mosquitto_session: MosquittoService,
) -> None:
    # Device publishes a request, the daemon's client replies (both QoS 1,
    # both with TCP_NODELAY). Without set_tcp_nodelay in the broker config the
    # median round trip is ~100 ms here (Nagle + delayed ACK); with it < 1 ms.
    request, reply = unique("fp-test/req"), unique("fp-test/reply")
    samples: list[float] = []
    with anyio.fail_after(20):
        async with (
            client(mosquitto_session, unique("device")) as device,
            client(mosquitto_session, unique("daemon")) as daemon,
            anyio.create_task_group() as tg,
        ):
            await device.subscribe(reply, qos=1)
            await daemon.subscribe(request, qos=1)

            async def echo() -> None:
                async for message in daemon.messages:
                    await daemon.publish(reply, message.payload, qos=1)

            tg.start_soon(echo)
            replies = aiter(device.messages)
            for i in range(30):
                t0 = time.perf_counter()
                await device.publish(request, str(i).encode(), qos=1)
                message = await anext(replies)
                samples.append(time.perf_counter() - t0)
                assert message.payload == str(i).encode()
            tg.cancel_scope.cancel()
    assert statistics.median(samples) < 0.02, sorted(samples)


def test_broker_config_derives_from_deploy_config(tmp_path: Path) -> None:
    text = mosquitto_config(12345, tmp_path)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    for expected in (
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {tmp_path}/",
        "max_queued_messages 100000",
        "listener 12345 127.0.0.1",
        "allow_anonymous true",
    ):
        assert expected in lines
    assert any(line.startswith("max_inflight_messages ") for line in lines)
    # Production paths and listeners are not inherited.
    assert "/var/lib/mosquitto" not in text
    assert "listener 1883" not in text
    # Every global tuning line of the deploy config is in the test config.
    deploy = DEPLOY_MOSQUITTO_CONF.read_text().split("\nlistener ")[0]
    for key in ("autosave_interval", "max_queued_bytes", "queue_qos0_messages"):
        assert any(line.startswith(key) for line in deploy.splitlines())
        assert any(line.startswith(key) for line in lines)
    # Overrides replace the inherited value.
    small = mosquitto_config(1, tmp_path, overrides={"max_queued_messages": 10})
    assert "max_queued_messages 10" in small.splitlines()
    assert "max_queued_messages 100000" not in small.splitlines()


def test_kill_then_start_on_the_same_port(mosquitto: MosquittoService) -> None:
    pid, port = mosquitto.pid, mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    with pytest.raises(OSError), socket.create_connection((mosquitto.host, port), timeout=1):
        pass
    mosquitto.start()
    assert mosquitto.running
    assert mosquitto.pid != pid
    assert mosquitto.port == port
    assert "mosquitto version" in mosquitto.log_path.read_text()


def test_start_failure_reports_the_log_tail(
    mosquitto_factory: Callable[..., MosquittoService],
) -> None:
    with pytest.raises(ServiceStartError, match='Unknown configuration variable "bogus_option"'):
        mosquitto_factory(overrides={"bogus_option": 1})


def test_port_taken_by_another_broker_is_a_start_failure(
    mosquitto_session: MosquittoService,
    mosquitto_factory: Callable[..., MosquittoService],
) -> None:
    # mosquitto 2.0 may keep running without a listener; the probe must not
    # mistake the other broker on that port for ours.
    with pytest.raises(ServiceStartError, match="Address already in use"):
        mosquitto_factory(port=mosquitto_session.port)
    assert mosquitto_session.running


def test_session_scoped_broker_refuses_restart(mosquitto_session: MosquittoService) -> None:
    with pytest.raises(RuntimeError, match="session-scoped"):
        mosquitto_session.restart()
    assert mosquitto_session.running


# ------------------------------------------------------------------ redis


async def test_redis_ping_set_get(redis_session: RedisService) -> None:
    key = unique("fp-test")
    with anyio.fail_after(5):
        async with aioredis.Redis.from_url(redis_session.url) as r:
            assert await r.ping()
            await r.set(key, b"value")
            assert await r.get(key) == b"value"


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_redis_data_survives_restart_and_crash_with_aof(
    redis_server: RedisService, how: str
) -> None:
    key = unique("fp-test")
    with anyio.fail_after(5):
        async with aioredis.Redis.from_url(redis_server.url) as r:
            await r.set(key, b"durable")

    if how == "restart":
        await redis_server.arestart()
    else:
        await redis_server.akill()
        await redis_server.astart()

    with anyio.fail_after(5):
        async with aioredis.Redis.from_url(redis_server.url) as r:
            assert await r.get(key) == b"durable"


async def test_redis_without_aof_loses_data_on_restart(
    redis_factory: Callable[..., RedisService],
) -> None:
    server: RedisService = redis_factory(appendonly=False)
    key = unique("fp-test")
    with anyio.fail_after(5):
        async with aioredis.Redis.from_url(server.url) as r:
            await r.set(key, b"volatile")
    await server.arestart()
    with anyio.fail_after(5):
        async with aioredis.Redis.from_url(server.url) as r:
            assert await r.get(key) is None


# ------------------------------------------------------- missing binaries


def test_missing_binary_skips_with_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("services.EXTRA_BIN_DIRS", ())
    monkeypatch.delenv("FLOWERPOWER_MOSQUITTO_BIN", raising=False)
    monkeypatch.delenv("FLOWERPOWER_REQUIRE_SERVICES", raising=False)
    assert find_binary("mosquitto") is None
    with pytest.raises(
        pytest.skip.Exception, match=r"^mosquitto binary not found: apt-get install mosquitto$"
    ):
        require_binary("mosquitto")


def test_missing_binary_fails_when_services_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWERPOWER_REDIS_BIN", "/nonexistent/redis-server")
    monkeypatch.setenv("FLOWERPOWER_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="redis-server binary not found"):
        require_binary("redis-server")


def test_binaries_are_found_outside_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Debian's mosquitto lives in /usr/sbin, often not on PATH.
    if not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("no /usr/sbin/mosquitto here")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FLOWERPOWER_MOSQUITTO_BIN", raising=False)
    assert find_binary("mosquitto") == "/usr/sbin/mosquitto"


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert port != free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
