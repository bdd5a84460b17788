"""The fleet view of ``status``: rows from retained status messages, workers passed on."""

from __future__ import annotations

from typing import Any, cast

import anyio
import orjson
import pytest

from flowerpower_daemon.control.api import DaemonControl, FleetDaemon
from flowerpower_daemon.control.commands import FLEET_WAIT, Commands
from flowerpower_daemon.control.protocol import ProtocolError, validate_args
from flowerpower_daemon.service.controls import fleet_daemon
from flowerpower_daemon.settings import Settings


def test_fleet_row_from_our_payload() -> None:
    """Our JSON status message gives every field; `self` is the answering daemon's topic."""
    payload = orjson.dumps(
        {
            "status": "online",
            "version": "1.2.3",
            "pipelines": ["a", "b"],
            "client_id": "d1",
            "host": "h1",
            "pid": 42,
        }
    )
    row = fleet_daemon("fp/status/d1", payload, "fp/status/d1")
    assert row == {
        "topic": "fp/status/d1",
        "client_id": "d1",
        "status": "online",
        "self": True,
        "version": "1.2.3",
        "pipelines": ["a", "b"],
        "host": "h1",
        "pid": 42,
    }
    assert not fleet_daemon("fp/status/d1", payload, "fp/status/d2")["self"]


def test_fleet_row_from_other_payloads() -> None:
    """A plain-text or partial payload is shown as it is, without made-up fields."""
    assert fleet_daemon("fp/status/d1", b"offline", "x", "fp/status/{client_id}") == {
        "topic": "fp/status/d1",
        "client_id": "d1",
        "status": "offline",
        "self": False,
    }
    row = fleet_daemon("t", b'{"status": "online", "pid": "nope"}', "x")
    assert row["status"] == "online" and "pid" not in row
    # No client_id in the payload: the topic's {client_id} part.
    row = fleet_daemon("fp/status/d-7/x", b"online", "x", "fp/status/d-{client_id}/x")
    assert row["client_id"] == "7"
    assert fleet_daemon("fp/other", b"online", "x", "fp/status/{client_id}")["client_id"] == ""


class _Daemon:
    """Just enough of DaemonControl for ``status``."""

    def __init__(self, status: dict[str, Any], fleet: list[FleetDaemon] | Exception) -> None:
        self._status = status
        self._fleet = fleet
        self.settings = Settings.model_validate({"mqtt": {"client_id": "me"}})
        self.ready = True
        self.waits: list[float] = []

    def status(self) -> dict[str, Any]:
        return self._status

    async def fleet_status(self, wait: float) -> list[FleetDaemon]:
        self.waits.append(wait)
        if isinstance(self._fleet, Exception):
            raise self._fleet
        return self._fleet


def _status(daemon: _Daemon, args: dict[str, object]) -> Any:
    commands = Commands(cast(DaemonControl, daemon))
    return anyio.run(commands.status, args, cast(Any, None), 1)


def test_status_with_fleet_adds_daemons_and_workers() -> None:
    """`fleet` is the daemon's status plus the broker's rows and the status's workers."""
    rows: list[FleetDaemon] = [{"topic": "t", "client_id": "me", "status": "online", "self": True}]
    workers = [{"name": "host:1", "in_flight": 0}]
    daemon = _Daemon({"version": "v", "workers": workers}, rows)
    answer = _status(daemon, {"fleet": True})
    assert answer["version"] == "v"
    assert answer["fleet"] == {
        "topic": "flowerpower/status/+",
        "wait_s": FLEET_WAIT,
        "daemons": rows,
        "workers": workers,
    }
    assert daemon.waits == [FLEET_WAIT]
    plain = _Daemon({"version": "v"}, rows)
    assert "fleet" not in _status(plain, {})
    assert plain.waits == []  # no broker round trip without `fleet`
    assert _status(plain, {"fleet": True})["fleet"]["workers"] == []


def test_status_with_fleet_and_no_broker_is_unavailable() -> None:
    """A broker that cannot be asked is an `unavailable` answer, not an internal error."""
    daemon = _Daemon({"version": "v"}, ConnectionError("broker 127.0.0.1:1: refused"))
    with pytest.raises(ProtocolError) as info:
        _status(daemon, {"fleet": True})
    assert info.value.code == "unavailable"
    assert "refused" in info.value.message


def test_fleet_is_a_bool_argument() -> None:
    """The protocol takes `fleet: true` for status and refuses other types."""
    assert validate_args("status", {"fleet": True}) == {"fleet": True}
    with pytest.raises(ProtocolError):
        validate_args("status", {"fleet": "yes"})
