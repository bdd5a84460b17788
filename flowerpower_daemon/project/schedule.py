"""Pure schedule math: parse cron / interval / date values and compute fire times.

Nothing here sleeps or reads a clock: every function takes the reference time
as an argument, so schedules are tested without a real clock. The daemon's
timer source (``triggers/timers.py``) does the sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from ..argtypes import CRON_FIELDS, INTERVAL_UNITS, cron_fields_text, parse_seconds

__all__ = [
    "CRON_FIELDS",
    "cron_from_fields",
    "next_cron_time",
    "next_interval_time",
    "parse_cron",
    "parse_date",
    "parse_interval",
    "parse_timezone",
    "resolve_wall_time",
]

_MAX_CRON_CANDIDATES = 1000


def cron_from_fields(fields: Mapping[str, object]) -> str:
    """Turn FlowerPower's ``{minute: "0", hour: "3", day_of_week: "mon-fri"}`` into a cron string.

    The result has six fields (seconds first, as croniter's ``second_at_beginning``).
    Missing fields are ``*`` except ``second``, which defaults to ``0`` so a
    dict without seconds fires once per minute at most, like a 5-field string.
    """
    unknown = sorted(set(fields) - set(CRON_FIELDS) - {"year", "week"})
    if unknown:
        raise ValueError(f"unknown cron field(s) {unknown}; valid fields: {list(CRON_FIELDS)}")
    for unsupported in ("year", "week"):
        value = fields.get(unsupported)
        if value is not None and str(value) != "*":
            raise ValueError(f"cron field {unsupported!r} is not supported (only '*')")
    return cron_fields_text(fields)


def parse_cron(value: object) -> str:
    """Validate a 5- or 6-field cron string (or a field dict) and return it normalised.

    A 6-field string has seconds first. The returned string always has six
    fields so that callers need only one croniter mode.
    """
    text = cron_from_fields(value) if isinstance(value, Mapping) else str(value).strip()
    parts = text.split()
    if len(parts) == 5:
        parts.insert(0, "0")
    elif len(parts) != 6:
        raise ValueError(f"cron expression {text!r} must have 5 or 6 fields, not {len(parts)}")
    normalised = " ".join(parts)
    if not croniter.is_valid(normalised, second_at_beginning=True):
        raise ValueError(f"invalid cron expression {text!r}")
    return normalised


def parse_interval(value: object) -> timedelta:
    """Parse ``30``, ``"30s"``, ``"1h30m"``, ``"250ms"`` or ``{hours: 1, minutes: 30}``."""
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"invalid interval {value!r}")
    elif isinstance(value, int | float):
        result = timedelta(seconds=float(value))
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(INTERVAL_UNITS))
        if unknown:
            raise ValueError(
                f"unknown interval field(s) {unknown}; valid fields: {sorted(INTERVAL_UNITS)}"
            )
        try:
            result = timedelta(**{k: float(v) for k, v in value.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid interval {dict(value)!r}: {exc}") from None
    else:
        text = str(value).strip()
        try:
            result = timedelta(seconds=parse_seconds(text))
        except ValueError:
            raise ValueError(
                f"invalid interval {text!r}; use seconds or a string like '30s', '1h30m'"
            ) from None
    if result <= timedelta(0):
        raise ValueError(f"interval {value!r} must be positive")
    return result


def parse_timezone(name: str | None) -> tzinfo:
    """Return the IANA zone ``name`` (UTC when ``None``)."""
    if name is None or name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {name!r} (use an IANA name such as 'Europe/Berlin')"
        ) from None


def parse_date(value: object, tz: tzinfo | None = None) -> datetime:
    """Parse an ISO 8601 time; a naive value is taken in ``tz`` (UTC by default)."""
    if isinstance(value, datetime):
        result = value
    else:
        try:
            result = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"invalid ISO 8601 date {value!r}") from None
    if result.tzinfo is None:
        result = result.replace(tzinfo=tz or UTC)
    return result


def next_cron_time(expr: str, after: datetime, tz: tzinfo | None = None) -> datetime:
    """The first fire time (UTC) of the 6-field ``expr`` strictly after the aware ``after``.

    ``expr`` matches wall-clock time in ``tz`` (UTC by default), so ``0 30 2 * * *``
    means 02:30 local on every day. Across DST changes each matching wall-clock
    time fires exactly once:

    - a time skipped by the spring gap fires at the first instant after the gap
      (Europe/Berlin, 2026-03-29: ``30 2 * * *`` fires at 03:00 CEST); several
      skipped times collapse into that one fire;
    - a time repeated by the autumn fold fires at its first occurrence only
      (2026-10-25: 02:30 CEST, not again at 02:30 CET). An hourly job thus runs
      at 02:00 CEST and next at 03:00 CET, two real hours later.

    Raises ``croniter.CroniterBadDateError`` (a ``ValueError``) when ``expr``
    never matches, such as the 30th of February.
    """
    zone = tz or UTC
    local = after.astimezone(zone)
    start = local.replace(tzinfo=None, fold=0)
    if local.fold == 1:
        first_pass = local.replace(fold=0)
        shift = (first_pass.utcoffset() or timedelta(0)) - (local.utcoffset() or timedelta(0))
        if shift > timedelta(0):
            # ``after`` is in the repeated hour's second pass: every wall time up to
            # the end of the fold already fired during the first pass.
            change = _offset_change(zone, first_pass.astimezone(UTC), after)
            fold_end = change.astimezone(zone).replace(tzinfo=None, fold=0) + shift
            start = max(start, fold_end - timedelta(seconds=1))
    # croniter sees the wall clock as UTC, which has no DST: pure wall-clock matching.
    walls = croniter(expr, start.replace(tzinfo=UTC), second_at_beginning=True)
    for _ in range(_MAX_CRON_CANDIDATES):
        wall: datetime = walls.get_next(datetime)
        instant = resolve_wall_time(wall.replace(tzinfo=None), zone)
        if instant > after:
            return instant
    raise RuntimeError(f"no fire time of {expr!r} after {after.isoformat()} (DST resolution)")


def resolve_wall_time(wall: datetime, tz: tzinfo) -> datetime:
    """The UTC instant at which the naive local ``wall`` time happens in ``tz``.

    An ambiguous time (autumn fold) resolves to its first occurrence; a time
    that does not exist (spring gap) to the instant the gap ends.
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first <= second:
        return first
    return _offset_change(tz, second, first)


def _offset_change(tz: tzinfo, lo: datetime, hi: datetime) -> datetime:
    """The first whole second in ``(lo, hi]`` whose UTC offset in ``tz`` differs from ``lo``'s.

    Zones change offset on whole seconds; ``hi`` must already have the new offset.
    """
    before = lo.astimezone(tz).utcoffset()
    low, high = math.floor(lo.timestamp()), math.ceil(hi.timestamp())
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == before:
            low = mid
        else:
            high = mid
    return datetime.fromtimestamp(high, UTC)


def next_interval_time(
    every: timedelta, after: datetime, start_at: datetime | None = None
) -> datetime:
    """The first tick of ``start_at + k * every`` strictly after ``after``.

    Ticks are anchored at ``start_at`` (or ``after`` itself when there is no
    anchor), so a late wake-up never shifts later ticks.
    """
    if start_at is None:
        return after + every
    if after < start_at:
        return start_at
    return start_at + every * ((after - start_at) // every + 1)
