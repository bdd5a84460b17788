"""Home Assistant discovery, the lifecycle: publish configs, run buttons, update sensors.

- **Buttons** are MQTT triggers (:func:`button_triggers`, part of the
  daemon's configured triggers): a press goes through the dispatcher like
  any MQTT message (decode, limits, ack after the run, results on the
  result topic). A reload that removes a pipeline removes its trigger, so
  its button no longer runs anything.
- **Configs** are published retained (QoS 1) once the daemon is online
  (:meth:`HomeAssistant.start`), again after each reconnect (a broker
  without persistence forgets them) and at every reload
  (:meth:`HomeAssistant.update`): a pipeline that is gone gets an empty
  retained payload on its config topics (Home Assistant removes the
  entity), a new one gets its configs. At start the configs already retained
  for this node are read back first, so a pipeline deleted while the daemon
  was down is removed too.
- **Sensors**: after each run :meth:`HomeAssistant.publish_state` publishes
  the status and the result message (retained) on the pipeline's state and
  attributes topics, called from the daemon's and the workers' result hooks
  (the executors' sink stays the MQTT one: it also re-publishes duplicates'
  earlier results); :class:`HomeAssistantSink` does it for the results of
  runs that ended without one (cancelled), which go through the job tracker.

The payloads themselves are built in :mod:`flowerpower_daemon.mqtt.homeassistant`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import anyio
import structlog

from ..mqtt.client import MqttError
from ..mqtt.homeassistant import Discovery, changed, removed
from ..mqtt.link import MqttLink, OutgoingMessage
from ..mqtt.sinks import ResultSink
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..settings import MqttSettings, MqttTrigger, Settings
from ..version import __version__

__all__ = ["TRIGGER_PREFIX", "HomeAssistant", "HomeAssistantSink", "button_triggers"]

log = structlog.get_logger("flowerpower_daemon.homeassistant")

#: Button triggers are named ``homeassistant:<pipeline>``.
TRIGGER_PREFIX = "homeassistant:"
#: How long the start-up read of this node's retained configs collects messages.
_RETAINED_WAIT = 1.0


def button_triggers(settings: Settings, project: FlowerPowerProject) -> list[MqttTrigger]:
    """One MQTT trigger per pipeline on its button's command topic (none when discovery is off).

    The press payload is a JSON object (``{}``): the run gets the pipeline's
    default inputs, or the inputs a JSON object carries; anything else is an
    error result, as for any trigger with ``payload_input: null``.
    """
    discovery = Discovery.from_settings(settings.homeassistant, settings.mqtt, __version__)
    if discovery is None:
        return []
    return [
        MqttTrigger(
            type="mqtt",
            name=f"{TRIGGER_PREFIX}{name}",
            pipeline=name,
            topic=discovery.command_topic(name),
            qos=1,
            payload="json",
            payload_input=None,
        )
        for name in sorted(project.pipelines)
    ]


class HomeAssistant:
    """Publishes this daemon's discovery configs and keeps track of what is retained."""

    def __init__(self, settings: Settings, link: MqttLink, mqtt: MqttSettings | None = None):
        #: The running MQTT settings (with the embedded broker: where it listens).
        self._mqtt = mqtt or settings.mqtt
        self.discovery = Discovery.from_settings(settings.homeassistant, self._mqtt, __version__)
        self.link = link
        self._published: dict[str, bytes] = {}  # config topic -> payload, retained by us
        self._lock = anyio.Lock()

    async def start(self, pipelines: Callable[[], Iterable[str]]) -> None:
        """Once online: read back this node's retained configs, then publish the current ones.

        ``pipelines`` is asked once the lock is held: a reload that came first has
        already changed the project (and :attr:`discovery`).
        """
        async with self._lock:
            discovery = self.discovery
            if discovery is not None:
                self._published = await self._retained(discovery)
                await self._publish(discovery, list(pipelines()))
        await self._republish_after_reconnects()

    async def _republish_after_reconnects(self) -> None:
        """Publish every config again after the link reconnects (runs until cancelled).

        A broker restarted without persistence has lost the retained configs (the
        link says ``online`` again on its own).
        """
        while True:
            await self.link.next_connect()
            async with self._lock:
                if self.discovery is not None and self._published:
                    for topic, payload in self._published.items():
                        await self.link.publish(OutgoingMessage(topic, payload, qos=1, retain=True))
                    log.info("homeassistant_discovery_republished", configs=len(self._published))

    async def update(self, settings: Settings, pipelines: Iterable[str]) -> None:
        """A reload: publish the new configs, empty the ones of pipelines (or a node) gone."""
        names = list(pipelines)
        async with self._lock:
            self.discovery = Discovery.from_settings(
                settings.homeassistant, self._mqtt, __version__
            )
            await self._publish(self.discovery, names)

    async def _publish(self, discovery: Discovery | None, pipelines: list[str]) -> None:
        new = discovery.configs(pipelines) if discovery is not None else {}
        gone = removed(self._published, new)
        fresh = changed(self._published, new)
        for topic in gone:
            await self.link.publish(OutgoingMessage(topic, b"", qos=1, retain=True))
        for topic, payload in fresh.items():
            await self.link.publish(OutgoingMessage(topic, payload, qos=1, retain=True))
        self._published = new
        if gone or fresh:
            log.info(
                "homeassistant_discovery_published",
                node_id=discovery.node_id if discovery is not None else None,
                pipelines=sorted(pipelines) if discovery is not None else [],
                published=len(fresh),
                removed=len(gone),
            )

    async def publish_state(self, result: RunResult) -> None:
        """Update ``result``'s pipeline sensor: its status and attributes (retained).

        A failure is logged: the sensor lags, the run and its result are not affected.
        """
        discovery = self.discovery
        if discovery is None:
            return
        try:
            for topic, payload in discovery.state_messages(result):
                await self.link.publish(OutgoingMessage(topic, payload, qos=1, retain=True))
        except Exception:
            log.exception("homeassistant_state_failed", run_id=result.run_id)

    async def _retained(self, discovery: Discovery) -> dict[str, bytes]:
        """This node's button and sensor configs the broker retains (empty if unreadable)."""
        from ..mqtt.client import retained_messages

        pattern = f"{discovery.prefix}/+/{discovery.node_id}/+/config"
        try:
            with anyio.fail_after(_RETAINED_WAIT + 10):
                found = await retained_messages(self._mqtt, pattern, _RETAINED_WAIT)
        except (MqttError, TimeoutError, OSError) as exc:
            log.warning("homeassistant_retained_unreadable", error=str(exc))
            return {}
        return _ours(discovery, found)


def _ours(discovery: Discovery, found: Mapping[str, bytes]) -> dict[str, bytes]:
    """The retained configs that are this node's buttons and sensors (non-empty ones)."""
    out: dict[str, bytes] = {}
    for topic, payload in found.items():
        levels = topic[len(discovery.prefix) + 1 :].split("/")
        if payload and len(levels) == 4 and levels[0] in ("button", "sensor"):
            out[topic] = payload
    return out


class HomeAssistantSink:
    """A result sink that also updates the run's pipeline sensor (state and attributes).

    The inner sink goes first (the result topic); a failure here is logged and
    never hides a result. The discovery in use is ``homeassistant``'s (a reload
    may switch it on or off).
    """

    def __init__(self, inner: ResultSink, homeassistant: HomeAssistant) -> None:
        self.inner = inner
        self.homeassistant = homeassistant

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        await self.inner.emit(request, result)
        await self.homeassistant.publish_state(result)
