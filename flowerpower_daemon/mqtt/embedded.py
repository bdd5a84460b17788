"""``mqtt.url: embedded``: an in-process MQTT broker (amqtt) for a machine with no Mosquitto.

Meant for the quick start and small single-machine set-ups: MQTT 3.1.1 only,
anonymous, loopback by default. Production deployments should use Mosquitto
with the recommended ``deploy/mosquitto.conf``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from ..errors import DependencyMissingError, FlowerPowerError
from ..settings import MqttSettings

__all__ = ["EmbeddedBrokerError", "embedded_broker"]


class EmbeddedBrokerError(FlowerPowerError, OSError):
    """The embedded broker cannot listen on ``mqtt.embedded_bind`` (e.g. the port is taken)."""


def _no_traceback(record: logging.LogRecord) -> bool:
    """amqtt logs a failed start with its traceback and then raises it: the raise
    is what the user sees (as one line), so the logged copy is dropped."""
    return record.exc_info is None


@contextmanager
def _filtered(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    logger.addFilter(_no_traceback)
    try:
        yield
    finally:
        logger.removeFilter(_no_traceback)


@asynccontextmanager
async def embedded_broker(settings: MqttSettings) -> AsyncIterator[MqttSettings]:
    """Start amqtt on ``settings.embedded_bind``; yield settings that point the client at it."""
    try:
        from amqtt.broker import Broker
        from amqtt.errors import BrokerError
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
    host, _, port = bind.rpartition(":")
    try:
        with _filtered("amqtt.broker"):
            await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__
        detail = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else exc
        raise EmbeddedBrokerError(
            f"mqtt.embedded_bind: the embedded broker cannot listen on port {port} of"
            f" {host}: {detail}; stop what uses the port, or set another mqtt.embedded_bind"
        ) from None
    try:
        yield settings.model_copy(update={"url": f"mqtt://{host}:{port}", "protocol": "3.1.1"})
    finally:
        with anyio.move_on_after(5, shield=True):
            await broker.shutdown()
