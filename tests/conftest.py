"""Shared fixtures and hooks. Service fixtures live in tests/services.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from services import (
    mosquitto,
    mosquitto_factory,
    mosquitto_session,
    redis_cluster,
    redis_factory,
    redis_sentinel,
    redis_server,
    redis_session,
    redis_tls,
)

__all__ = [
    "mosquitto",
    "mosquitto_factory",
    "mosquitto_session",
    "redis_cluster",
    "redis_factory",
    "redis_sentinel",
    "redis_server",
    "redis_session",
    "redis_tls",
]

_MQTT_FIXTURES = frozenset({"mosquitto", "mosquitto_factory", "mosquitto_session"})
_REDIS_FIXTURES = frozenset(
    {"redis_server", "redis_factory", "redis_session", "redis_cluster", "redis_sentinel", "redis_tls"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests using a real broker/server, so `-m "not mqtt and not redis"` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _MQTT_FIXTURES:
            item.add_marker(pytest.mark.mqtt)
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(autouse=True, scope="session")
def _own_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started by the tests remember their socket under a runtime dir of the test
    session, not the user's (``$XDG_RUNTIME_DIR/flowerpower-daemon/socket``)."""
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    yield
    if old is None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
    else:
        os.environ["XDG_RUNTIME_DIR"] = old


@pytest.fixture(autouse=True)
def _logging_reset() -> Iterator[None]:
    """A test that runs an entry point in-process configures logging onto its captured
    stderr; the next test must not write to that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
