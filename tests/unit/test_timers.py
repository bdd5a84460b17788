"""Timer triggers: pure fire-time math (cron, DST, intervals, dates) and the sleeping iterator."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpower_daemon.project.config import ScheduleConfig
from flowerpower_daemon.sources import TimerSpec, TriggerEvent, next_fire, timer_events

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def cron(expr: str, tz: str | None = None, **kw: object) -> TimerSpec:
    return TimerSpec("t", "cron", cron=expr, timezone=tz, **kw)  # type: ignore[arg-type]


def interval(seconds: float, start_at: datetime | None = None, **kw: object) -> TimerSpec:
    return TimerSpec("t", "interval", every=timedelta(seconds=seconds), start_at=start_at, **kw)  # type: ignore[arg-type]


def date(at: datetime, **kw: object) -> TimerSpec:
    return TimerSpec("t", "date", date=at, **kw)  # type: ignore[arg-type]


def fires(spec: TimerSpec, after: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    for _ in range(n):
        nxt = next_fire(spec, after)
        assert nxt is not None
        out.append(nxt)
        after = nxt
    return out


def local(times: list[datetime], tz: ZoneInfo = BERLIN) -> list[str]:
    return [t.astimezone(tz).isoformat() for t in times]


# --- TimerSpec ---------------------------------------------------------------------------


def test_spec_normalises_five_field_cron() -> None:
    """A 5-field cron string is stored as 6 fields, seconds first."""
    assert cron("30 2 * * *").cron == "0 30 2 * * *"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "cron"},
        {"kind": "interval", "cron": "* * * * *"},
        {"kind": "cron", "cron": "* * * * *", "every": timedelta(seconds=1)},
        {"kind": "cron", "cron": "61 * * * *"},
        {"kind": "cron", "cron": "* * * * *", "timezone": "Mars/Olympus"},
        {"kind": "interval", "every": timedelta(0)},
        {"kind": "interval", "every": timedelta(seconds=1), "jitter": -1.0},
        {"kind": "date", "date": T0, "start_at": T0},
        {"kind": "date", "date": T0, "misfire_grace": -1.0},
        {"kind": "weekly", "cron": "* * * * *"},
    ],
)
def test_spec_rejects_inconsistent_fields(kwargs: dict[str, object]) -> None:
    """A spec whose fields do not fit its kind is a ValueError naming the timer."""
    with pytest.raises(ValueError, match=r"'t'|cron|timezone"):
        TimerSpec("t", **kwargs)  # type: ignore[arg-type]


def test_spec_reads_naive_datetimes_in_its_timezone() -> None:
    """Naive ``date``/``start_at`` values are wall-clock times of the spec's zone."""
    spec = TimerSpec("t", "date", date=datetime(2026, 7, 1, 9, 0), timezone="Europe/Berlin")
    assert spec.date == datetime(2026, 7, 1, 7, 0, tzinfo=UTC)


def test_from_schedule_builds_each_kind() -> None:
    """A pipeline's ``schedule:`` block becomes the matching TimerSpec."""
    by_cron = ScheduleConfig.model_validate({"cron": "*/5 * * * *", "timezone": "Europe/Berlin"})
    spec = TimerSpec.from_schedule("p", by_cron, jitter=2.0, misfire_grace=60.0)
    assert (spec.kind, spec.cron, spec.timezone) == ("cron", "0 */5 * * * *", "Europe/Berlin")
    assert (spec.jitter, spec.misfire_grace) == (2.0, 60.0)
    every = TimerSpec.from_schedule("p", ScheduleConfig.model_validate({"interval": "1h30m"}))
    assert (every.kind, every.every) == ("interval", timedelta(hours=1, minutes=30))
    once = TimerSpec.from_schedule("p", ScheduleConfig.model_validate({"date": "2026-07-01T09:00"}))
    assert (once.kind, once.date) == ("date", datetime(2026, 7, 1, 9, tzinfo=UTC))


def test_from_schedule_without_a_kind_is_an_error() -> None:
    """An empty schedule block has no timer to build."""
    with pytest.raises(ValueError, match="none of cron, interval, date"):
        TimerSpec.from_schedule("p", ScheduleConfig())


# --- cron --------------------------------------------------------------------------------


def test_cron_five_fields_fires_on_the_minute() -> None:
    """``*/15 * * * *`` fires at the next quarter hour, second 0."""
    assert next_fire(cron("*/15 * * * *"), datetime(2026, 6, 1, 10, 7, 30, tzinfo=UTC)) == (
        datetime(2026, 6, 1, 10, 15, tzinfo=UTC)
    )


def test_cron_six_fields_has_seconds_first() -> None:
    """``*/10 * * * * *`` fires every ten seconds."""
    after = datetime(2026, 6, 1, 10, 0, 5, 500000, tzinfo=UTC)
    assert fires(cron("*/10 * * * * *"), after, 3) == [
        datetime(2026, 6, 1, 10, 0, s, tzinfo=UTC) for s in (10, 20, 30)
    ]


def test_cron_is_strictly_after_a_fire_time() -> None:
    """Asking from a fire time itself gives the following fire, never the same one."""
    at = datetime(2026, 6, 1, 10, 15, tzinfo=UTC)
    assert next_fire(cron("*/15 * * * *"), at) == at + timedelta(minutes=15)


def test_cron_reads_wall_clock_of_its_timezone() -> None:
    """09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer."""
    spec = cron("0 9 * * *", "America/New_York")
    assert next_fire(spec, datetime(2026, 1, 10, tzinfo=UTC)) == datetime(
        2026, 1, 10, 14, tzinfo=UTC
    )
    assert next_fire(spec, datetime(2026, 7, 10, tzinfo=UTC)) == datetime(
        2026, 7, 10, 13, tzinfo=UTC
    )


def test_cron_results_are_utc() -> None:
    """Fire times come back as UTC datetimes whatever the trigger's zone."""
    result = next_fire(cron("0 9 * * *", "Asia/Tokyo"), T0)
    assert result is not None and result.tzinfo is UTC


def test_cron_honours_start_at() -> None:
    """A cron trigger's ``start_at`` is its earliest fire."""
    start = datetime(2026, 6, 3, 0, 0, tzinfo=UTC)
    assert next_fire(cron("0 * * * *", start_at=start), T0) == start
    assert next_fire(cron("0 * * * *", start_at=start), start) == start + timedelta(hours=1)


def test_cron_that_never_matches_has_no_next_fire() -> None:
    """The 30th of February never comes: ``None``, not an endless search."""
    assert next_fire(cron("0 0 30 2 *"), T0) is None


def test_dst_spring_gap_fires_once_when_the_gap_ends() -> None:
    """Berlin 2026-03-29: 02:30 does not exist, so ``30 2 * * *`` fires at 03:00 CEST."""
    got = fires(cron("30 2 * * *", "Europe/Berlin"), datetime(2026, 3, 27, 12, tzinfo=UTC), 3)
    assert local(got) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]


def test_dst_autumn_fold_fires_once_at_first_occurrence() -> None:
    """Berlin 2026-10-25: 02:30 happens twice; ``30 2 * * *`` fires at 02:30 CEST only."""
    got = fires(cron("30 2 * * *", "Europe/Berlin"), datetime(2026, 10, 23, 12, tzinfo=UTC), 3)
    assert local(got) == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


@pytest.mark.parametrize(
    "after",
    [
        datetime(2026, 10, 25, 0, 45, tzinfo=UTC),  # 02:45 CEST, first pass
        datetime(2026, 10, 25, 1, 10, tzinfo=UTC),  # 02:10 CET, second pass
        datetime(2026, 10, 25, 1, 30, tzinfo=UTC),  # 02:30 CET, the repeat itself
    ],
)
def test_dst_fold_never_refires_from_inside_the_fold(after: datetime) -> None:
    """From anywhere in the repeated hour, the next 02:30 is the next day's."""
    got = next_fire(cron("30 2 * * *", "Europe/Berlin"), after)
    assert got == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_dst_hourly_cron_across_both_changes() -> None:
    """Hourly: 01:00 CET then 03:00 CEST in spring; 02:00 CEST then 03:00 CET in autumn."""
    spec = cron("0 * * * *", "Europe/Berlin")
    spring = fires(spec, datetime(2026, 3, 28, 23, 30, tzinfo=UTC), 3)
    assert local(spring) == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]
    autumn = fires(spec, datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 3)
    assert local(autumn) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]


def test_dst_gap_collapses_several_skipped_times() -> None:
    """``*/15 2 * * *`` on the spring day: the four skipped times fire once, at 03:00 CEST."""
    got = fires(cron("*/15 2 * * *", "Europe/Berlin"), datetime(2026, 3, 27, 12, tzinfo=UTC), 3)
    assert local(got) == [
        "2026-03-28T02:00:00+01:00",
        "2026-03-28T02:15:00+01:00",
        "2026-03-28T02:30:00+01:00",
    ]
    got = fires(cron("*/15 2 * * *", "Europe/Berlin"), datetime(2026, 3, 29, 0, 0, tzinfo=UTC), 2)
    assert local(got) == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]


def test_dst_every_second_from_second_pass_jumps_to_fold_end() -> None:
    """An every-second cron asked from the repeated hour continues after the fold."""
    after = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET, wall times already fired
    assert next_fire(cron("* * * * * *", "Europe/Berlin"), after) == datetime(
        2026, 10, 25, 2, 0, tzinfo=UTC
    )


def test_dst_half_hour_shift_lord_howe() -> None:
    """Lord Howe shifts by 30 min: 02:10 is skipped in October and fires at 02:30 instead."""
    tz = ZoneInfo("Australia/Lord_Howe")
    got = fires(cron("10 2 * * *", "Australia/Lord_Howe"), datetime(2026, 10, 2, tzinfo=UTC), 3)
    assert local(got, tz) == [
        "2026-10-03T02:10:00+10:30",
        "2026-10-04T02:30:00+11:00",
        "2026-10-05T02:10:00+11:00",
    ]


def test_dst_whole_year_daily_fires_once_per_local_day() -> None:
    """``30 2 * * *`` in Berlin over 2026: 365 fires, one per local date, 03:00 on 29 March."""
    spec = cron("30 2 * * *", "Europe/Berlin")
    got = fires(spec, datetime(2025, 12, 31, 23, 0, tzinfo=UTC), 365)
    walls = [t.astimezone(BERLIN) for t in got]
    assert [w.date() for w in walls] == [
        (datetime(2026, 1, 1) + timedelta(days=i)).date() for i in range(365)
    ]
    odd = [w.isoformat() for w in walls if (w.hour, w.minute) != (2, 30)]
    assert odd == ["2026-03-29T03:00:00+02:00"]


@pytest.mark.parametrize(
    "day", [datetime(2026, 3, 27, tzinfo=UTC), datetime(2026, 10, 23, tzinfo=UTC)]
)
def test_dst_hourly_fires_once_per_wall_hour_around_a_change(day: datetime) -> None:
    """Hourly in Berlin over four days around a change: every wall hour fires exactly once."""
    got = [
        t
        for t in fires(cron("0 * * * *", "Europe/Berlin"), day, 110)
        if t < day + timedelta(days=4)
    ]
    walls = [t.astimezone(BERLIN).replace(tzinfo=None) for t in got]
    assert len(set(walls)) == len(walls)
    # 95 whole real hours follow ``day``. In spring each fires (the missing 02:00 merges
    # into 03:00 CEST, one real hour after 01:00 CET); in autumn 02:00 CET repeats a wall time.
    assert len(got) == (95 if day.month == 3 else 94)
    gaps = [b - a for a, b in itertools.pairwise(got)]
    expected_two_hour_gaps = 0 if day.month == 3 else 1
    assert gaps.count(timedelta(hours=2)) == expected_two_hour_gaps
    assert all(g in (timedelta(hours=1), timedelta(hours=2)) for g in gaps)


# A brute-force model of the DST rules, minute by minute in UTC: a minute fires when its
# first-pass wall time matches, or when it ends a gap that skipped a matching wall time.
_PREDICATES: dict[str, Callable[[datetime], bool]] = {
    "30 2 * * *": lambda w: (w.hour, w.minute) == (2, 30),
    "0 * * * *": lambda w: w.minute == 0,
    "*/20 1-3 * * *": lambda w: 1 <= w.hour <= 3 and w.minute % 20 == 0,
    "15 3 * * *": lambda w: (w.hour, w.minute) == (3, 15),
    "45 1 * * *": lambda w: (w.hour, w.minute) == (1, 45),
    "0 0 * * *": lambda w: (w.hour, w.minute) == (0, 0),
    "10,40 2 * * *": lambda w: w.hour == 2 and w.minute in (10, 40),
    "* 2 * * *": lambda w: w.hour == 2,
}
_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe")


def _reference_next(expr: str, zone: ZoneInfo, after: datetime) -> datetime:
    matches = _PREDICATES[expr]
    step = timedelta(minutes=1)
    t = after.astimezone(UTC).replace(second=0, microsecond=0) + step
    while True:
        here = t.astimezone(zone)
        wall = here.replace(tzinfo=None)
        if here.fold == 0 and matches(wall):
            return t
        before = (t - step).astimezone(zone).replace(tzinfo=None)
        skipped = before + step
        while skipped < wall:
            if matches(skipped):
                return t
            skipped += step
        t += step


@cache
def _transitions(zone_name: str) -> tuple[datetime, ...]:
    zone = ZoneInfo(zone_name)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    found = []
    while t.year == 2026:
        if (
            t.astimezone(zone).utcoffset()
            != (t + timedelta(minutes=30)).astimezone(zone).utcoffset()
        ):
            found.append(t)
        t += timedelta(minutes=30)
    return tuple(found)


@settings(max_examples=80, deadline=None)
@given(
    expr=st.sampled_from(sorted(_PREDICATES)),
    zone_name=st.sampled_from(_ZONES),
    which=st.integers(0, 1),
    offset_s=st.integers(-30 * 3600, 30 * 3600),
)
def test_dst_cron_matches_brute_force_model(
    expr: str, zone_name: str, which: int, offset_s: int
) -> None:
    """Around every 2026 DST change of three zones, next_fire equals a minute-by-minute model."""
    after = _transitions(zone_name)[which] + timedelta(seconds=offset_s)
    zone = ZoneInfo(zone_name)
    assert next_fire(cron(expr, zone_name), after) == _reference_next(expr, zone, after)


# --- interval and date -------------------------------------------------------------------


def test_interval_without_anchor_is_after_plus_every() -> None:
    """With no ``start_at`` the next tick is simply ``after + every``."""
    assert next_fire(interval(90), T0) == T0 + timedelta(seconds=90)


def test_interval_ticks_on_the_start_at_grid() -> None:
    """With ``start_at`` ticks are ``start_at + k * every``; a future anchor is the first tick."""
    start = datetime(2026, 6, 1, 11, 59, 50, tzinfo=UTC)
    assert next_fire(interval(30, start), T0) == datetime(2026, 6, 1, 12, 0, 20, tzinfo=UTC)
    assert next_fire(interval(30, start), start) == start + timedelta(seconds=30)
    later = T0 + timedelta(days=1)
    assert next_fire(interval(30, later), T0) == later


_aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=100, deadline=None)
@given(
    start=_aware,
    after=_aware,
    every_us=st.integers(1_000, 30 * 86_400 * 10**6),
)
def test_interval_anchoring_property(start: datetime, after: datetime, every_us: int) -> None:
    """next_fire is after ``after``, on the ``start_at + k*every`` grid, and the first such tick."""
    every = timedelta(microseconds=every_us)
    got = next_fire(interval(every.total_seconds(), start), after)
    assert got is not None
    assert got > after
    k, rest = divmod(got - start, every)
    assert rest == timedelta(0) and k >= 0
    assert got == start or got - every <= after


def test_date_fires_once_then_nothing() -> None:
    """A date trigger's only fire is its date, and only while that is still ahead."""
    at = T0 + timedelta(hours=1)
    assert next_fire(date(at), T0) == at
    assert next_fire(date(at), at) is None
    assert next_fire(date(at), at + timedelta(days=1)) is None


def test_next_fire_rejects_naive_reference() -> None:
    """A naive ``after`` is ambiguous: ValueError rather than a guess."""
    with pytest.raises(ValueError, match="aware"):
        next_fire(interval(1), datetime(2026, 1, 1))


# --- timer_events with a fake clock ------------------------------------------------------


@dataclass
class FakeClock:
    """A wall clock that moves only when slept on; ``drift[i]`` is added to the i-th sleep.

    A positive drift is a late wake (or a suspend), a negative one an early wake.
    """

    t: datetime = T0
    sleeps: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        drift = self.drift.pop(0) if self.drift else 0.0
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=max(0.0, seconds + drift))
        await anyio.lowlevel.checkpoint()


async def take(
    events: AsyncGenerator[TriggerEvent, None], n: int | None = None
) -> list[TriggerEvent]:
    out: list[TriggerEvent] = []
    with anyio.fail_after(5):
        async with aclosing(events) as it:
            async for event in it:
                out.append(event)
                if len(out) == n:
                    break
    return out


def scheduled(events: list[TriggerEvent]) -> list[datetime]:
    return [datetime.fromisoformat(e.meta["scheduled"]) for e in events]


async def test_events_carry_name_kind_and_schedule() -> None:
    """Each event names its trigger and kind; meta has the scheduled ISO time and epoch."""
    clock = FakeClock()
    (event,) = await take(timer_events(interval(10), now=clock.now, sleep=clock.sleep), 1)
    assert (event.trigger, event.kind, event.at) == ("t", "interval", T0 + timedelta(seconds=10))
    assert event.meta["scheduled"] == "2026-06-01T12:00:10+00:00"
    assert event.meta["scheduled_ts"] == (T0 + timedelta(seconds=10)).timestamp()
    assert event.payload is None and event.ack is None


async def test_late_wakes_do_not_drift() -> None:
    """Waking 50 ms late every time leaves the scheduled times on the exact grid."""
    clock = FakeClock(drift=[0.05] * 20)
    got = await take(timer_events(interval(1), now=clock.now, sleep=clock.sleep), 5)
    assert scheduled(got) == [T0 + timedelta(seconds=k) for k in range(1, 6)]
    assert [e.at for e in got] == [T0 + timedelta(seconds=k + 0.05) for k in range(1, 6)]


async def test_early_wakes_sleep_again_until_the_deadline() -> None:
    """A sleep that returns early is followed by another: no event before its time."""
    clock = FakeClock(drift=[-0.5, -0.001, 0.0, -0.2, 0.0])
    got = await take(timer_events(interval(8), now=clock.now, sleep=clock.sleep), 2)
    assert [e.at for e in got] == scheduled(got) == [T0 + timedelta(seconds=8 * k) for k in (1, 2)]
    assert clock.sleeps == pytest.approx([8.0, 0.5, 0.001, 8.0, 0.2])


async def test_suspend_collapses_missed_fires_into_one() -> None:
    """Waking 10.5 periods late fires once, then resumes on the grid after the wake."""
    clock = FakeClock(drift=[105.0])
    got = await take(timer_events(interval(10), now=clock.now, sleep=clock.sleep), 2)
    assert scheduled(got) == [T0 + timedelta(seconds=10), T0 + timedelta(seconds=120)]
    assert got[0].at == T0 + timedelta(seconds=115)


async def test_misfire_grace_drops_a_late_fire() -> None:
    """A fire later than ``misfire_grace`` is skipped; the next on-time one is yielded."""
    clock = FakeClock(drift=[5.0])
    spec = interval(10, misfire_grace=1.0)
    (event,) = await take(timer_events(spec, now=clock.now, sleep=clock.sleep), 1)
    assert scheduled([event]) == [T0 + timedelta(seconds=20)]


async def test_long_waits_are_cut_into_bounded_sleeps() -> None:
    """An hour's wait is slept in chunks, so a suspend or clock step is noticed in time."""
    clock = FakeClock()
    await take(timer_events(interval(3600), now=clock.now, sleep=clock.sleep), 1)
    assert len(clock.sleeps) == 12 and sum(clock.sleeps) == 3600


async def test_jitter_delays_within_bound_without_moving_schedule() -> None:
    """Jitter delays each fire by at most ``jitter`` seconds; scheduled times stay on grid."""
    clock = FakeClock()
    spec = interval(10, jitter=2.0)
    got = await take(timer_events(spec, now=clock.now, sleep=clock.sleep, rng=random.Random(7)), 5)
    assert scheduled(got) == [T0 + timedelta(seconds=10 * k) for k in range(1, 6)]
    delays = [(e.at - s).total_seconds() for e, s in zip(got, scheduled(got), strict=True)]
    assert all(0.0 <= d <= 2.0 for d in delays) and len(set(delays)) > 1


async def test_future_date_fires_once_and_ends() -> None:
    """A date ahead is slept to, fired once, and the iterator then ends."""
    clock = FakeClock()
    at = T0 + timedelta(minutes=3)
    got = await take(timer_events(date(at), now=clock.now, sleep=clock.sleep))
    assert scheduled(got) == [at] and got[0].at == at


async def test_past_date_within_grace_fires_immediately() -> None:
    """A date already past, but within ``misfire_grace``, fires at once without sleeping."""
    clock = FakeClock()
    at = T0 - timedelta(seconds=30)
    got = await take(timer_events(date(at, misfire_grace=60.0), now=clock.now, sleep=clock.sleep))
    assert scheduled(got) == [at] and got[0].at == T0 and clock.sleeps == []


async def test_past_date_without_grace_fires_immediately() -> None:
    """With no ``misfire_grace`` even a long-past date fires once."""
    clock = FakeClock()
    got = await take(timer_events(date(T0 - timedelta(days=3)), now=clock.now, sleep=clock.sleep))
    assert len(got) == 1


async def test_past_date_beyond_grace_yields_nothing() -> None:
    """A date older than ``misfire_grace`` yields nothing and the iterator returns."""
    clock = FakeClock()
    spec = date(T0 - timedelta(minutes=5), misfire_grace=60.0)
    assert await take(timer_events(spec, now=clock.now, sleep=clock.sleep)) == []


async def test_date_already_fired_yields_nothing() -> None:
    """A ``last_fire`` at or after the date means the date trigger is done."""
    clock = FakeClock()
    at = T0 - timedelta(minutes=5)
    assert await take(timer_events(date(at), now=clock.now, sleep=clock.sleep, last_fire=at)) == []


async def test_last_fire_makes_up_missed_cron_fires_once() -> None:
    """Restarting days after ``last_fire`` runs the latest missed fire now, then the schedule."""
    clock = FakeClock()
    spec = cron("0 2 * * *")
    last = datetime(2026, 5, 29, 2, 0, tzinfo=UTC)
    got = await take(timer_events(spec, now=clock.now, sleep=clock.sleep, last_fire=last), 2)
    assert scheduled(got) == [
        datetime(2026, 6, 1, 2, tzinfo=UTC),
        datetime(2026, 6, 2, 2, tzinfo=UTC),
    ]
    assert got[0].at == T0
    assert [e.meta.get("catch_up", False) for e in got] == [True, False]


async def test_interval_last_fire_anchors_the_grid() -> None:
    """An interval without ``start_at`` continues the grid of ``last_fire``."""
    clock = FakeClock()
    last = T0 - timedelta(seconds=25)
    got = await take(
        timer_events(interval(10), now=clock.now, sleep=clock.sleep, last_fire=last), 2
    )
    assert scheduled(got) == [T0 - timedelta(seconds=5), T0 + timedelta(seconds=5)]


# --- timer_events on the real clock ------------------------------------------------------


async def test_real_clock_every_second_cron() -> None:
    """``* * * * * *`` yields about three events in 3.2 s, on whole seconds."""
    got: list[TriggerEvent] = []
    with anyio.move_on_after(3.2):
        async with aclosing(timer_events(cron("* * * * * *"))) as events:
            async for event in events:
                assert event.kind == "cron"
                got.append(event)
    assert 2 <= len(got) <= 4
    ts = [e.meta["scheduled_ts"] for e in got]
    assert all(t == int(t) for t in ts) and ts == sorted(set(ts))
    assert all(e.at >= s for e, s in zip(got, scheduled(got), strict=True))


async def test_real_clock_interval() -> None:
    """A 0.2 s interval yields 5 events in bounded time, on the 0.2 s grid."""
    with anyio.fail_after(5):
        got = await take(timer_events(interval(0.2)), 5)
    ts = [e.meta["scheduled_ts"] for e in got]
    assert ts == sorted(set(ts))
    # On a busy machine a late wake may collapse ticks, but every tick stays on the grid.
    steps = [(t - ts[0]) / 0.2 for t in ts]
    assert all(abs(k - round(k)) < 1e-6 for k in steps)
    assert all(e.at >= s for e, s in zip(got, scheduled(got), strict=True))
