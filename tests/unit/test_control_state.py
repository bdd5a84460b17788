"""Job history, schedule store, event bus, sd_notify and the ctl's own parsing, in isolation."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from flowerpower_daemon.control.client import _parser, _request, default_socket, parse_duration
from flowerpower_daemon.control.events import EventBus
from flowerpower_daemon.project.models import AttemptInfo, ErrorInfo, RunResult, TriggerInfo
from flowerpower_daemon.service.reload import diff
from flowerpower_daemon.service.systemd import Notifier
from flowerpower_daemon.state.history import SqliteHistory
from flowerpower_daemon.state.schedules import Schedule, ScheduleStore


def _result(
    run_id: str,
    pipeline: str = "p",
    status: str = "success",
    *,
    age: timedelta = timedelta(0),
    outputs: dict[str, object] | None = None,
) -> RunResult:
    end = datetime.now(UTC) - age
    error = None if status == "success" else ErrorInfo("RuntimeError", "boom")
    return RunResult(
        run_id=run_id,
        pipeline=pipeline,
        status=status,  # type: ignore[arg-type]
        outputs=outputs or {"x": 1},
        error=error,
        attempts=(AttemptInfo(1, end, end, status, error),),  # type: ignore[arg-type]
        queued_at=end,
        started_at=end,
        finished_at=end,
        trigger=TriggerInfo("t", "cron"),
    )


# ----------------------------------------------------------------- history


async def test_history_records_lists_and_gets(tmp_path: Path) -> None:
    """Recorded runs come back newest first, filtered, and in full by id."""
    async with SqliteHistory(tmp_path / "h.sqlite3") as history, anyio.create_task_group() as tg:
        await tg.start(history.run)
        await history.record(_result("a", age=timedelta(seconds=3)))
        await history.record(_result("b", "q", "failed", age=timedelta(seconds=2)))
        await history.record(_result("c", age=timedelta(seconds=1)))
        assert [r["run_id"] for r in await history.recent()] == ["c", "b", "a"]
        assert [r["run_id"] for r in await history.recent(pipeline="p", limit=1)] == ["c"]
        failed = await history.recent(states=("failed",))
        assert [r["run_id"] for r in failed] == ["b"]
        assert failed[0]["error"] == {"type": "RuntimeError", "message": "boom"}
        full = await history.get("a")
        assert full is not None and full["result"]["outputs"] == {"x": 1}
        assert await history.get("nope") is None
        whole = _result("w")  # whole seconds: isoformat writes no fraction
        whole.queued_at = whole.started_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        await history.record(whole)
        row = (await history.recent(limit=1))[0]
        assert row["queued_at"] == row["started_at"] == "2026-01-02T03:04:05+00:00"
        assert row["finished_at"] == whole.finished_at.isoformat()
        tg.cancel_scope.cancel()
    assert oct(os.stat(tmp_path / "h.sqlite3").st_mode & 0o777) == "0o600"


async def test_history_is_bounded_by_count_and_age(tmp_path: Path) -> None:
    """Pruning keeps at most max_jobs rows and none older than max_age."""
    path = tmp_path / "h.sqlite3"
    async with SqliteHistory(path, max_jobs=5, prune_every=1) as history:
        await history.record(_result("old", age=timedelta(days=30)))
        for i in range(8):
            await history.record(_result(f"r{i}", age=timedelta(seconds=10 - i)))
        await history.count()  # writes what is queued, pruning as it goes
        assert await history.count() == 5
        assert [r["run_id"] for r in await history.recent(limit=10)] == [
            f"r{i}" for i in range(7, 2, -1)
        ]
    async with SqliteHistory(path) as again:  # survives a reopen
        assert await again.count() == 5


async def test_history_caps_the_stored_result(tmp_path: Path) -> None:
    """A huge output is stored as a truncated marker, not in full."""
    async with SqliteHistory(tmp_path / "h.sqlite3", max_result_bytes=2048) as history:
        await history.record(_result("big", outputs={"blob": "x" * 100_000}))
        full = await history.get("big")
    assert full is not None
    assert full["result"]["outputs"]["blob"]["__type__"] == "truncated"


# ---------------------------------------------------------------- schedules


async def test_schedule_store_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    """Schedules and pause state survive a save and a load."""
    store = ScheduleStore.load(tmp_path)
    store.schedules["s1"] = Schedule.new("s1", "p", "cron", "*/5 * * * *", inputs={"a": 1})
    store.schedules["s2"] = Schedule.new("s2", "p", "interval", "90s")
    store.set_paused(["s1", "cfg"], True)
    await store.save()
    assert oct(os.stat(tmp_path / "schedules.json").st_mode & 0o777) == "0o600"
    again = ScheduleStore.load(tmp_path)
    assert again.schedules == store.schedules and again.paused == {"s1", "cfg"}
    triggers = {t.name: t for t in again.triggers()}
    assert triggers["s1"].cron == "0 */5 * * * *" and triggers["s1"].inputs == {"a": 1}
    assert triggers["s2"].every == timedelta(seconds=90)


def test_unreadable_schedule_file_is_moved_aside(tmp_path: Path) -> None:
    """A corrupt schedules.json does not stop the daemon: it is kept aside, the store is empty."""
    (tmp_path / "schedules.json").write_text("{broken")
    assert ScheduleStore.load(tmp_path).schedules == {}
    assert any(p.name.startswith("schedules.json.corrupt-") for p in tmp_path.iterdir())


def test_schedule_validation_names_the_problem() -> None:
    """A bad cron or date is a ValueError naming the schedule."""
    with pytest.raises(ValueError, match="'bad'"):
        Schedule.new("bad", "p", "cron", "every minute").to_trigger()
    with pytest.raises(ValueError, match="ISO"):
        Schedule.new("d", "p", "date", "tomorrow").to_trigger()
    tz = Schedule.new("d", "p", "date", "2030-01-01T08:00", timezone="Europe/Berlin").to_trigger()
    assert tz.at == datetime(2030, 1, 1, 7, 0, tzinfo=UTC)


def test_reload_diff() -> None:
    """diff() names added, removed and changed triggers by name."""
    a = Schedule.new("a", "p", "interval", "1h").to_trigger()
    b = Schedule.new("b", "p", "interval", "1h").to_trigger()
    b2 = Schedule.new("b", "p", "interval", "2h").to_trigger()
    c = Schedule.new("c", "p", "interval", "1h").to_trigger()
    d = diff({"a": a, "b": b}, [b2, c])
    assert (d.added, d.removed, d.changed) == (["c"], ["a"], ["b"])


# ---------------------------------------------------------------- event bus


async def test_event_bus_fans_out_and_drops_for_slow_subscribers() -> None:
    """Each subscriber gets every event; a full buffer drops and reports the count."""
    bus = EventBus(buffer=2)
    bus.publish("nobody_listens")
    with bus.subscribe() as fast, bus.subscribe() as slow:
        bus.publish("one", n=1)
        assert (await fast.receive())["type"] == "one"
        bus.publish("two")
        assert (await fast.receive())["type"] == "two"
        bus.publish("three")  # slow's buffer (2) is full now
        bus.publish("four")
        assert [(await slow.receive())["type"] for _ in range(2)] == ["one", "two"]
        bus.publish("five")
        assert (await slow.receive()) | {"time": None} == {
            "type": "five",
            "time": None,
            "dropped": 2,
        }
    assert bus.subscribers == 0


# ---------------------------------------------------------------- sd_notify


def test_notifier_is_silent_without_notify_socket() -> None:
    """Without $NOTIFY_SOCKET nothing is sent and the watchdog returns at once."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.stopping() is False
    anyio.run(notifier.watchdog)


def test_notifier_sends_datagrams_and_honours_watchdog_pid(tmp_path: Path) -> None:
    """Messages arrive as KEY=value lines; WATCHDOG_USEC for another pid is ignored."""
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_usec == 2_000_000
        assert notifier.ready("3 triggers")
        assert listener.recv(256) == b"READY=1\nSTATUS=3 triggers"
        assert notifier.reloading()
        assert listener.recv(256).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        notifier.close()
    other = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other.watchdog_usec is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert gone.ready() is False
    gone.close()


# --------------------------------------------------------------- ctl parsing


def test_ctl_parses_durations_and_builds_requests() -> None:
    """Durations, and the protocol request each command line becomes."""
    assert parse_duration("90") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    with pytest.raises(Exception, match="invalid duration"):
        parse_duration("soon")
    args = _parser().parse_args(["run", "p", "--inputs", '{"a": 1}', "--run-in", "5m", "--wait"])
    assert _request(args) == (
        "run",
        {"pipeline": "p", "wait": True, "inputs": {"a": 1}, "run_in": 300.0},
    )
    args = _parser().parse_args(["schedule", "add", "p", "--cron", "* * * * *", "--id", "x"])
    assert _request(args) == (
        "schedule_add",
        {"pipeline": "p", "overwrite": False, "cron": "* * * * *", "id": "x"},
    )
    assert _request(_parser().parse_args(["pause", "--all"])) == ("pause", {"all": True})
    assert _request(_parser().parse_args(["schedule", "rm", "x"])) == ("schedule_rm", {"id": "x"})


def test_ctl_default_socket(tmp_path: Path) -> None:
    """--socket, then $FLOWERPOWER_CONTROL__SOCKET, then $RUNTIME_DIRECTORY, then ./.flowerpower."""
    assert default_socket({"FLOWERPOWER_CONTROL__SOCKET": "/x.sock"}) == "/x.sock"
    assert default_socket({"RUNTIME_DIRECTORY": "/run/fp"}) == "/run/fp/control.sock"
    if not os.path.exists("/run/flowerpower-daemon/control.sock"):
        # A home without a remembered socket (a daemon of another test may have left one).
        nothing = {"HOME": str(tmp_path)}
        assert default_socket(nothing, cwd=str(tmp_path)) == os.path.join(
            ".flowerpower", "control.sock"
        )


def test_history_bounds_come_from_settings(tmp_path: Path) -> None:
    """history.max_jobs / max_age / max_result_bytes reach the store; Redis queue -> Redis history."""
    from flowerpower_daemon.settings import Settings
    from flowerpower_daemon.state.history import RedisHistory, SqliteHistory, history_for

    local = history_for(Settings(state_dir=str(tmp_path), history={"max_jobs": 5, "max_age": "2h"}))
    assert isinstance(local, SqliteHistory)
    assert (local.max_jobs, local.max_age) == (5, timedelta(hours=2))
    assert local.path == tmp_path / "history.sqlite3"
    shared = history_for(Settings(queue={"broker": "redis://h:6379/0", "queue_name": "q"}))
    assert isinstance(shared, RedisHistory) and shared.prefix == "q:history"
