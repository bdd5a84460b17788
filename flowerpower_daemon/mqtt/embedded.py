"""``mqtt.url: embedded``: an in-process MQTT broker (amqtt) for a machine with no Mosquitto.

Meant for the quick start and small single-machine set-ups: MQTT 3.1.1 only,
anonymous, loopback by default. Production deployments should use Mosquitto
with the recommended ``deploy/mosquitto.conf``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import DependencyMissingError
from ..settings import MqttSettings

__all__ = ["embedded_broker"]


@asynccontextmanager
async def embedded_broker(settings: MqttSettings) -> AsyncIterator[MqttSettings]:
    """Start amqtt on ``settings.embedded_bind``; yield settings that point the client at it."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise DependencyMissingError(
            "mqtt.url 'embedded' needs amqtt: pip install 'flowerpower-daemon[embedded]'"
        ) from exc
    import anyio

    bind = settings.embedded_bind
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            "sys_interval": 0,
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        host, _, port = bind.rpartition(":")
        yield settings.model_copy(update={"url": f"mqtt://{host}:{port}", "protocol": "3.1.1"})
    finally:
        with anyio.move_on_after(5, shield=True):
            await broker.shutdown()
