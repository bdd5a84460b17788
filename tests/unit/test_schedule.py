"""Pure schedule math: parsing cron / interval / date values and computing fire times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpower_daemon.project.schedule import (
    cron_from_fields,
    next_cron_time,
    next_interval_time,
    parse_cron,
    parse_date,
    parse_interval,
    parse_timezone,
)

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    """A UTC datetime, for brevity."""
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*/5 * * * *", "0 */5 * * * *"),
        ("  0 3 * * mon-fri ", "0 0 3 * * mon-fri"),
        ("15 0 3 * * *", "15 0 3 * * *"),
        ({"minute": "0", "hour": "3", "day_of_week": "mon-fri"}, "0 0 3 * * mon-fri"),
        ({"second": 30, "minute": "*/2"}, "30 */2 * * * *"),
    ],
)
def test_parse_cron_normalises_to_six_fields(value: str | dict[str, object], expected: str) -> None:
    """5-field strings, 6-field strings (seconds first) and field dicts become six fields."""
    assert parse_cron(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("* * * *", "must have 5 or 6 fields, not 4"),
        ("* * * * * * *", "must have 5 or 6 fields, not 7"),
        ("61 * * * *", "invalid cron expression '61 * * * *'"),
        ("* * * * funday", "invalid cron expression '* * * * funday'"),
    ],
)
def test_parse_cron_rejects_bad_values(value: str, message: str) -> None:
    """A bad cron string is a ValueError quoting it."""
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        parse_cron(value)


def test_cron_fields_reject_unknown_names() -> None:
    """A misspelt cron field is named, with the valid ones."""
    with pytest.raises(ValueError, match=r"unknown cron field\(s\) \['hours'\]"):
        cron_from_fields({"hours": "3"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, timedelta(seconds=30)),
        (0.5, timedelta(seconds=0.5)),
        ("45", timedelta(seconds=45)),
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1H 30M", timedelta(hours=1, minutes=30)),
        ("2w", timedelta(weeks=2)),
        ("250ms", timedelta(milliseconds=250)),
        ("1m30s", timedelta(seconds=90)),
        ({"hours": 1, "minutes": 30}, timedelta(hours=1, minutes=30)),
        (timedelta(minutes=2), timedelta(minutes=2)),
    ],
)
def test_parse_interval_forms(value: object, expected: timedelta) -> None:
    """Seconds, unit strings and unit mappings all parse to the same timedelta."""
    assert parse_interval(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "1h30", "h", "", "1x", 0, -5, "0s", True, {"hour": 1}])
def test_parse_interval_rejects_bad_values(value: object) -> None:
    """A malformed, zero or negative interval is a ValueError quoting the value."""
    with pytest.raises(ValueError, match="interval"):
        parse_interval(value)  # type: ignore[arg-type]


def test_parse_date_naive_takes_the_zone() -> None:
    """A naive ISO date is taken in the given zone; an aware one keeps its offset."""
    assert parse_date("2030-01-02T03:04:05") == utc(2030, 1, 2, 3, 4, 5)
    assert parse_date("2030-01-02T03:04:05", BERLIN).utcoffset() == timedelta(hours=1)
    assert parse_date("2030-01-02T03:04:05+02:00") == utc(2030, 1, 2, 1, 4, 5)
    with pytest.raises(ValueError, match="invalid ISO 8601 date 'next week'"):
        parse_date("next week")


def test_parse_timezone() -> None:
    """IANA names resolve; None and 'UTC' are UTC; an unknown name is named in the error."""
    assert parse_timezone(None) is UTC
    assert parse_timezone("utc") is UTC
    assert parse_timezone("Europe/Berlin") == BERLIN
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        parse_timezone("Mars/Olympus")


def test_next_cron_time_is_strictly_after() -> None:
    """The next fire time is strictly after the reference, even when the reference matches."""
    expr = parse_cron("*/15 * * * *")
    assert next_cron_time(expr, utc(2030, 1, 1, 10, 0)) == utc(2030, 1, 1, 10, 15)
    assert next_cron_time(expr, utc(2030, 1, 1, 10, 7, 30)) == utc(2030, 1, 1, 10, 15)


def test_next_cron_time_six_fields_fire_on_seconds() -> None:
    """A 6-field cron expression fires on its seconds."""
    expr = parse_cron("*/10 * * * * *")
    assert next_cron_time(expr, utc(2030, 1, 1, 0, 0, 1)) == utc(2030, 1, 1, 0, 0, 10)


def test_next_cron_time_weekdays_from_fields() -> None:
    """``{minute: 0, hour: 3, day_of_week: mon-fri}`` skips the weekend."""
    expr = parse_cron({"minute": "0", "hour": "3", "day_of_week": "mon-fri"})
    friday_noon = utc(2030, 1, 4, 12, 0)  # 2030-01-04 is a Friday
    assert next_cron_time(expr, friday_noon) == utc(2030, 1, 7, 3, 0)


def test_next_cron_time_in_local_wall_time() -> None:
    """With a timezone, the cron matches local wall-clock time and the result is UTC."""
    expr = parse_cron("0 3 * * *")
    winter = next_cron_time(expr, utc(2030, 1, 1, 12, 0), BERLIN)
    summer = next_cron_time(expr, utc(2030, 7, 1, 12, 0), BERLIN)
    assert winter == utc(2030, 1, 2, 2, 0)
    assert summer == utc(2030, 7, 2, 1, 0)
    assert winter.tzinfo is UTC


def test_next_cron_time_dst_gap_fires_once_after_the_gap() -> None:
    """A local time skipped by the spring change fires once, when the gap ends."""
    expr = parse_cron("30 2 * * *")
    fire = next_cron_time(expr, utc(2026, 3, 28, 12, 0), BERLIN)
    assert fire.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 29, 3, 0)
    after = next_cron_time(expr, fire, BERLIN)
    assert after.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 30, 2, 30)


def test_next_cron_time_dst_fold_fires_once() -> None:
    """A local time repeated by the autumn change fires at its first occurrence only."""
    expr = parse_cron("30 2 * * *")
    fire = next_cron_time(expr, utc(2026, 10, 24, 12, 0), BERLIN)
    assert fire == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    after = next_cron_time(expr, fire, BERLIN)
    assert after.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 10, 26, 2, 30)


def test_next_interval_time_without_anchor() -> None:
    """Without an anchor the next tick is one interval after the reference."""
    assert next_interval_time(timedelta(seconds=30), utc(2030, 1, 1)) == utc(2030, 1, 1, 0, 0, 30)


def test_next_interval_time_before_anchor_is_the_anchor() -> None:
    """Before the anchor, the first tick is the anchor itself."""
    start = utc(2030, 1, 1, 12)
    assert next_interval_time(timedelta(hours=1), utc(2030, 1, 1), start) == start


@settings(deadline=None)  # pure math; a loaded machine must not fail it
@given(
    every_s=st.integers(min_value=1, max_value=86_400),
    offset_s=st.floats(min_value=0, max_value=10 * 86_400, allow_nan=False),
)
def test_next_interval_time_is_an_anchored_tick_after_the_reference(
    every_s: int, offset_s: float
) -> None:
    """The next tick is on the anchor's grid, strictly after the reference, at most one step."""
    every = timedelta(seconds=every_s)
    start = utc(2030, 1, 1)
    after = start + timedelta(seconds=offset_s)
    tick = next_interval_time(every, after, start)
    assert after < tick <= after + every
    assert (tick - start) % every == timedelta(0)
