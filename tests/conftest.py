"""Shared fixtures and hooks. Service fixtures live in tests/services.py."""

from __future__ import annotations

import pytest
from services import (
    mosquitto,
    mosquitto_factory,
    mosquitto_session,
    redis_factory,
    redis_server,
    redis_session,
)

__all__ = [
    "mosquitto",
    "mosquitto_factory",
    "mosquitto_session",
    "redis_factory",
    "redis_server",
    "redis_session",
]

_MQTT_FIXTURES = frozenset({"mosquitto", "mosquitto_factory", "mosquitto_session"})
_REDIS_FIXTURES = frozenset({"redis_server", "redis_factory", "redis_session"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests using a real broker/server, so `-m "not mqtt and not redis"` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _MQTT_FIXTURES:
            item.add_marker(pytest.mark.mqtt)
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
