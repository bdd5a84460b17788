"""Reconnecting to an unreachable broker: each failed attempt is one ``mqtt_disconnected``."""

from __future__ import annotations

from typing import Any

import aiomqtt
import anyio
import pytest
from structlog.testing import capture_logs

from flowerpower_daemon.mqtt.link import MqttLink
from flowerpower_daemon.settings import MqttSettings
from tests.services import free_port


def _settings(port: int) -> MqttSettings:
    return MqttSettings(url=f"mqtt://127.0.0.1:{port}", reconnect_min=0.05, reconnect_max=0.1)


def _disconnects(logs: list[dict[str, Any]], level: str, client_id: str) -> int:
    return sum(
        1
        for e in logs
        if e["event"] == "mqtt_disconnected"
        and e["log_level"] == level
        and e["client_id"] == client_id
    )


async def _run_for(seconds: float, *links: MqttLink) -> None:
    """Run the links (nothing listens on their port), then stop them."""
    with anyio.fail_after(seconds + 10):
        async with anyio.create_task_group() as tg:
            for link in links:
                await tg.start(link.run)
            await anyio.sleep(seconds)
            for link in links:
                link.stop()


async def test_a_link_warns_once_per_failed_attempt() -> None:
    """A link alone: every failed connect is one warning, naming its client id."""
    settings = _settings(free_port())
    link = MqttLink(settings, client_id="solo")
    with capture_logs() as logs:
        await _run_for(0.6, link)
    warnings = _disconnects(logs, "warning", "solo")
    assert warnings >= 3, logs
    assert warnings == sum(1 for e in logs if e["event"] == "mqtt_disconnected"), logs


async def test_the_results_link_leaves_an_outage_to_its_companion() -> None:
    """Two links on one unreachable broker: the warnings are the companion's, one per attempt."""
    settings = _settings(free_port())
    link = MqttLink(settings, client_id="in", max_held=10)
    publisher = MqttLink(settings, client_id="in-results", companion=link)
    with capture_logs() as logs:
        await _run_for(0.6, publisher, link)
    assert _disconnects(logs, "warning", "in") >= 3, logs
    assert _disconnects(logs, "warning", "in-results") == 0, logs
    assert _disconnects(logs, "debug", "in-results") >= 3, logs


@pytest.mark.parametrize(("failures", "level"), [(1, "debug"), (2, "warning"), (5, "warning")])
def test_repeated_failures_of_the_results_link_alone_are_warned(failures: int, level: str) -> None:
    """While the companion is connected, the results link's repeated failures are its own."""
    settings = _settings(1)
    link = MqttLink(settings, client_id="in")
    link._client = object()  # type: ignore[assignment]  # connected, as far as the log cares
    publisher = MqttLink(settings, client_id="in-results", companion=link)
    with capture_logs() as logs:
        publisher._log_failure(aiomqtt.MqttError("refused"), failures, 0.5)
    assert [(e["log_level"], e["client_id"]) for e in logs] == [(level, "in-results")]
