"""Timers after downtime: which missed fire times run (pure math), the iterator, the settings."""

from __future__ import annotations

import time
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.settings import load_settings
from flowerpower_daemon.sources import TimerSpec, TriggerEvent, next_fire, timer_events
from flowerpower_daemon.sources.timers import catch_up_fires
from flowerpower_daemon.state.timerstate import SqliteTimerState, lock_ttl

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def cron(expr: str, **kw: Any) -> TimerSpec:
    return TimerSpec("t", "cron", cron=expr, **kw)


def every(seconds: float, start_at: datetime | None = None, **kw: Any) -> TimerSpec:
    return TimerSpec("t", "interval", every=timedelta(seconds=seconds), start_at=start_at, **kw)


def brute_force(spec: TimerSpec, last: datetime, now: datetime) -> list[datetime]:
    """Every fire time in (last, now] within the grace, by walking next_fire (the model)."""
    out: list[datetime] = []
    fire = next_fire(spec, last)
    while fire is not None and fire <= now:
        if spec.misfire_grace is None or now - fire <= timedelta(seconds=spec.misfire_grace):
            out.append(fire)
        fire = next_fire(spec, fire)
    if spec.catch_up == "none":
        return []
    return out[-1:] if spec.catch_up == "latest" else out[-spec.max_catch_up :]


# --- catch_up_fires: policies ----------------------------------------------------------


def test_two_missed_fires_per_policy() -> None:
    """Down across two fires of a 3-second cron: none runs 0, latest 1 (the newer), all 2."""
    last, now = T0, T0 + 7 * S  # missed: T0+3, T0+6
    assert catch_up_fires(cron("*/3 * * * * *", catch_up="none"), last, now) == []
    assert catch_up_fires(cron("*/3 * * * * *", catch_up="latest"), last, now) == [T0 + 6 * S]
    assert catch_up_fires(cron("*/3 * * * * *", catch_up="all"), last, now) == [
        T0 + 3 * S,
        T0 + 6 * S,
    ]


def test_default_policy_is_latest() -> None:
    """Without a catch_up a spec runs the latest missed fire once."""
    assert catch_up_fires(cron("0 * * * * *"), T0, T0 + timedelta(minutes=5, seconds=1)) == [
        T0 + timedelta(minutes=5)
    ]


def test_no_last_fire_starts_fresh() -> None:
    """A cron or interval timer without a stored last fire catches nothing up."""
    assert catch_up_fires(cron("* * * * * *", catch_up="all"), None, T0) == []
    assert catch_up_fires(every(1, start_at=T0 - 60 * S, catch_up="all"), None, T0) == []


def test_last_fire_itself_is_not_missed_but_a_fire_at_now_is() -> None:
    """Missed means after the last fire, up to and including now."""
    spec = cron("*/5 * * * * *", catch_up="all")
    assert catch_up_fires(spec, T0, T0 + 4 * S) == []
    assert catch_up_fires(spec, T0, T0 + 5 * S) == [T0 + 5 * S]


def test_all_is_bounded_by_max_catch_up_keeping_the_newest() -> None:
    """1,000 missed fires with max_catch_up=5: the newest five, oldest first."""
    spec = every(1, start_at=T0, catch_up="all", max_catch_up=5)
    got = catch_up_fires(spec, T0, T0 + 1000 * S)
    assert got == [T0 + k * S for k in range(996, 1001)]


def test_misfire_grace_drops_older_fires_boundary_included() -> None:
    """A fire exactly misfire_grace old still runs; one a microsecond older does not."""
    spec = every(10, start_at=T0, catch_up="all", misfire_grace=20.0)
    now = T0 + 60 * S
    assert catch_up_fires(spec, T0, now) == [T0 + 40 * S, T0 + 50 * S, T0 + 60 * S]
    later = now + timedelta(microseconds=1)
    assert catch_up_fires(spec, T0, later) == [T0 + 50 * S, T0 + 60 * S]


def test_grace_older_than_every_missed_fire_runs_nothing() -> None:
    """Down for a day with a one-hour grace on a daily cron: the missed fire is too old."""
    spec = cron("0 0 3 * * *", catch_up="latest", misfire_grace=3600.0)
    last = datetime(2026, 5, 31, 3, tzinfo=UTC)
    assert catch_up_fires(spec, last, datetime(2026, 6, 1, 9, tzinfo=UTC)) == []
    assert catch_up_fires(spec, last, datetime(2026, 6, 1, 3, 59, tzinfo=UTC)) == [
        datetime(2026, 6, 1, 3, tzinfo=UTC)
    ]


def test_last_fire_in_the_future_runs_nothing() -> None:
    """A stored time ahead of now (the clock stepped back) is not a reason to fire."""
    assert catch_up_fires(cron("* * * * * *", catch_up="all"), T0 + 60 * S, T0) == []


def test_interval_grid_continues_from_start_at() -> None:
    """Missed interval fires lie on the start_at grid, not on the last fire's."""
    spec = every(10, start_at=T0 + 3 * S, catch_up="all")
    assert catch_up_fires(spec, T0, T0 + 25 * S) == [T0 + 3 * S, T0 + 13 * S, T0 + 23 * S]


def test_cron_catch_up_across_the_spring_gap() -> None:
    """02:30 Berlin is skipped on 2026-03-29; its catch-up is the 03:00 CEST fire, once."""
    spec = TimerSpec("t", "cron", cron="30 2 * * *", timezone="Europe/Berlin", catch_up="all")
    last = datetime(2026, 3, 28, 1, 30, tzinfo=UTC)  # 02:30 CET on the 28th
    now = datetime(2026, 3, 30, 6, 0, tzinfo=UTC)
    assert catch_up_fires(spec, last, now) == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # 03:00 CEST, the gap's end
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
    ]


def test_long_downtime_of_a_frequent_timer_is_cheap() -> None:
    """A year of an every-second cron without grace: found without walking every fire."""
    started = time.perf_counter()
    spec = cron("* * * * * *", catch_up="all", max_catch_up=3, misfire_grace=None)
    got = catch_up_fires(spec, T0 - timedelta(days=365), T0)
    assert got == [T0 - 2 * S, T0 - S, T0]
    spec = every(1, start_at=T0 - timedelta(days=365), catch_up="latest")
    assert catch_up_fires(spec, T0 - timedelta(days=365), T0 + 0.5 * S) == [T0]
    assert time.perf_counter() - started < 2.0


def test_sparse_cron_reaches_back_to_the_last_fire() -> None:
    """A yearly cron missed once, 300 days ago, with no grace, is still found."""
    spec = cron("0 0 0 1 1 *", catch_up="latest", misfire_grace=None)
    last = datetime(2025, 1, 1, tzinfo=UTC)
    assert catch_up_fires(spec, last, T0) == [datetime(2026, 1, 1, tzinfo=UTC)]


# --- catch_up_fires: dates -------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "last", "policy", "expected"),
    [
        (T0 - 30 * S, None, "latest", True),  # passed while down, within grace
        (T0 - 30 * S, None, "all", True),
        (T0 - 30 * S, None, "none", False),  # none: a missed date is skipped
        (T0 - 2 * 3600 * S, None, "latest", False),  # older than the grace
        (T0 - 30 * S, T0 - 30 * S, "latest", False),  # already fired
        (T0 + 30 * S, None, "latest", False),  # still ahead: the regular fire
    ],
)
def test_date_catch_up(at: datetime, last: datetime | None, policy: str, expected: bool) -> None:
    spec = TimerSpec("t", "date", date=at, misfire_grace=3600.0, catch_up=policy)  # type: ignore[arg-type]
    assert catch_up_fires(spec, last, T0) == ([at] if expected else [])


# --- catch_up_fires against the brute-force model --------------------------------------

# Expression -> longest downtime tried (seconds): the model walks every fire, ~0.3 ms each.
CRONS = {
    "* * * * * *": 300,
    "*/7 * * * * *": 2100,
    "0 */5 * * * *": 86400,
    "30 2 * * *": 4 * 86400,
    "0 0 9-17 * * 1-5": 4 * 86400,
}


@settings(max_examples=60, deadline=None)
@given(
    expr=st.sampled_from(sorted(CRONS)),
    zone=st.sampled_from([None, "Europe/Berlin", "America/New_York"]),
    last_s=st.integers(0, 3 * 86400),
    down_frac=st.floats(0, 1),
    grace=st.one_of(st.none(), st.integers(0, 86400)),
    policy=st.sampled_from(["none", "latest", "all"]),
    bound=st.integers(1, 50),
)
def test_cron_catch_up_matches_brute_force(
    expr: str,
    zone: str | None,
    last_s: int,
    down_frac: float,
    grace: int | None,
    policy: str,
    bound: int,
) -> None:
    """The windowed search finds exactly the model's fire times (around both DST changes)."""
    base = datetime(2026, 3, 27, tzinfo=UTC) if last_s % 2 else datetime(2026, 10, 23, tzinfo=UTC)
    spec = TimerSpec(
        "t",
        "cron",
        cron=expr,
        timezone=zone,
        misfire_grace=None if grace is None else float(grace),
        catch_up=policy,
        max_catch_up=bound,  # type: ignore[arg-type]
    )
    last = base + timedelta(seconds=last_s)
    now = last + timedelta(seconds=down_frac * CRONS[expr], microseconds=last_s % 1000)
    assert catch_up_fires(spec, last, now) == brute_force(spec, last, now)


@settings(max_examples=100, deadline=None)
@given(
    every_ms=st.integers(1, 600_000),
    offset_ms=st.integers(-(10**7), 10**7),
    down_ms=st.integers(0, 10**8),
    grace=st.one_of(st.none(), st.floats(0, 10**5)),
    policy=st.sampled_from(["none", "latest", "all"]),
    bound=st.integers(1, 50),
)
def test_interval_catch_up_matches_brute_force(
    every_ms: int, offset_ms: int, down_ms: int, grace: float | None, policy: str, bound: int
) -> None:
    """Intervals: the newest fires on the start_at grid, within the grace, up to the bound."""
    spec = every(
        every_ms / 1000,
        start_at=T0 + timedelta(milliseconds=offset_ms),
        misfire_grace=grace,
        catch_up=policy,
        max_catch_up=bound,
    )
    now = T0 + timedelta(milliseconds=down_ms)
    got = catch_up_fires(spec, T0, now)
    # The model: the grid in (T0, now], newest first, in the grace, then the bound.
    step = timedelta(milliseconds=every_ms)
    fire = next_fire(spec, now)
    assert fire is not None
    newest: list[datetime] = []
    fire -= step
    while fire > T0 and fire >= spec.start_at and len(newest) < bound:  # type: ignore[operator]
        if grace is not None and now - fire > timedelta(seconds=grace):
            break
        newest.append(fire)
        fire -= step
    expected = (
        [] if policy == "none" else sorted(newest)[-1:] if policy == "latest" else sorted(newest)
    )
    assert got == expected


# --- TimerSpec validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"catch_up": "sometimes"}, "catch_up"), ({"max_catch_up": 0}, "max_catch_up")],
)
def test_spec_rejects_bad_catch_up(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cron("* * * * *", **kwargs)


# --- timer_events: catch-up first, then the schedule -------------------------------------


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)
        await anyio.lowlevel.checkpoint()


async def _events(spec: TimerSpec, last: datetime | None, n: int) -> list[TriggerEvent]:
    clock = Clock(T0 + 7 * S)
    out: list[TriggerEvent] = []
    with anyio.fail_after(5):
        async with aclosing(
            timer_events(spec, now=clock.now, sleep=clock.sleep, last_fire=last)
        ) as events:
            async for event in events:
                out.append(event)
                if len(out) == n:
                    break
    return out


@pytest.mark.parametrize(
    ("policy", "caught_up"),
    [("none", []), ("latest", [6]), ("all", [3, 6])],
)
async def test_events_catch_up_then_follow_the_schedule(policy: str, caught_up: list[int]) -> None:
    """Caught-up fires come first, marked ``catch_up``, at the start time; then fires at 9, 12."""
    spec = cron("*/3 * * * * *", catch_up=policy)
    got = await _events(spec, T0, len(caught_up) + 2)
    scheduled = [datetime.fromisoformat(e.meta["scheduled"]) for e in got]
    assert scheduled == [T0 + k * S for k in [*caught_up, 9, 12]]
    assert [bool(e.meta.get("catch_up")) for e in got] == [True] * len(caught_up) + [False] * 2
    assert all(e.at == T0 + 7 * S for e in got[: len(caught_up)])


async def test_events_without_last_fire_start_fresh() -> None:
    """No stored last fire: the first event is the next regular fire."""
    (event,) = await _events(cron("*/3 * * * * *", catch_up="all"), None, 1)
    assert event.meta["scheduled"] == (T0 + 9 * S).isoformat() and "catch_up" not in event.meta


async def test_interval_catch_up_keeps_the_last_fires_grid() -> None:
    """An interval without start_at continues the grid of the last fire after a restart."""
    got = await _events(every(2.5, catch_up="all"), T0 - 0.5 * S, 4)
    assert [e.meta["scheduled_ts"] - T0.timestamp() for e in got] == [2.0, 4.5, 7.0, 9.5]
    assert [bool(e.meta.get("catch_up")) for e in got] == [True, True, True, False]


# --- settings ----------------------------------------------------------------------------


def _load(tmp_path: Path, trigger: str) -> Any:
    path = tmp_path / "daemon.yml"
    path.write_text("triggers:\n  - pipeline: stats\n" + trigger)
    return load_settings(str(path)).triggers[0]


def test_settings_defaults(tmp_path: Path) -> None:
    """Defaults: catch_up latest everywhere, grace one hour for cron and date, none for interval."""
    c = _load(tmp_path, "    type: cron\n    cron: '* * * * *'\n")
    i = _load(tmp_path, "    type: interval\n    every: 10s\n")
    d = _load(tmp_path, "    type: date\n    at: '2030-01-01T00:00:00Z'\n")
    assert (c.catch_up, c.max_catch_up, c.misfire_grace) == ("latest", 100, 3600.0)
    assert (i.catch_up, i.max_catch_up, i.misfire_grace) == ("latest", 100, None)
    assert (d.catch_up, d.misfire_grace) == ("latest", 3600.0)
    i = _load(tmp_path, "    type: interval\n    every: 10s\n    catch_up: none\n")
    assert i.catch_up == "none"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("    catch_up: sometimes\n", "triggers[0].catch_up"),
        ("    catch_up: true\n", "triggers[0].catch_up"),
        ("    max_catch_up: 0\n", "triggers[0].max_catch_up"),
        ("    misfire_grace: -1\n", "triggers[0].misfire_grace"),
    ],
)
def test_bad_catch_up_names_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "    type: cron\n    cron: '* * * * *'\n" + extra)
    text = str(info.value)
    assert key in text, text
    if extra.strip().startswith("catch_up"):
        assert "'none', 'latest' or 'all'" in text


# --- the SQLite state store --------------------------------------------------------------


async def test_sqlite_state_keeps_the_newest_fire_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "timers.sqlite3"
    async with SqliteTimerState(path) as state:
        assert await state.last_fire("a") is None
        await state.record("a", T0 + 5 * S)
        await state.record("a", T0 + 3 * S)  # an older fire recorded late does not go back
        await state.record("b", T0)
        assert await state.claim("a", T0, 60.0)
    async with SqliteTimerState(path) as state:
        assert await state.last_fire("a") == T0 + 5 * S
        assert await state.last_fire("b") == T0


async def test_sqlite_anchor_is_kept_until_a_fire_replaces_it(tmp_path: Path) -> None:
    """An interval's first start is stored once; later starts get it (or the last fire) back."""
    async with SqliteTimerState(tmp_path / "timers.sqlite3") as state:
        assert await state.anchor("i", T0) == T0
        assert await state.anchor("i", T0 + 60 * S) == T0
        await state.record("i", T0 + 10 * S)
        assert await state.anchor("i", T0 + 60 * S) == T0 + 10 * S


def test_lock_ttl_covers_the_grace() -> None:
    assert lock_ttl(None) == 3660
    assert lock_ttl(0.0) == 60
    assert lock_ttl(3600.0) == 3660
    assert lock_ttl(10**9) == 86400
