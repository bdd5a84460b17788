"""Cron, interval and one-shot date triggers: an async iterator of :class:`TriggerEvent`.

The time math is pure (:func:`next_fire`, built on :mod:`..project.schedule`);
:func:`timer_events` only sleeps until each fire time. It sleeps until an
absolute deadline and re-checks the wall clock after every wake, because an
event loop may wake a little early, a monotonic clock stands still while the
machine is suspended and the wall clock may be stepped. Each next fire time is
computed from the previous *scheduled* time, never from the wake time, so
lateness does not accumulate into drift.

Cron expressions match wall-clock time in the timer's IANA zone, and each
matching wall-clock time fires once across DST changes: a time skipped by the
spring gap fires at the first instant after the gap (Europe/Berlin 2026-03-29,
``30 2 * * *`` at 03:00 CEST), a time repeated by the autumn fold only at its
first occurrence (2026-10-25, 02:30 CEST and not 02:30 CET).

After downtime, :func:`catch_up_fires` (pure, too) picks which of the fire
times missed since the last recorded fire are run at start-up, by the
timer's ``catch_up`` policy, ``misfire_grace`` and ``max_catch_up``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import anyio
import anyio.lowlevel
import structlog
from croniter import CroniterBadDateError

from ..project.config import ScheduleConfig
from ..project.models import utcnow
from ..project.schedule import (
    next_cron_time,
    next_interval_time,
    parse_cron,
    parse_date,
    parse_timezone,
)
from .base import TriggerEvent

__all__ = ["CatchUp", "TimerKind", "TimerSpec", "catch_up_fires", "next_fire", "timer_events"]

TimerKind = Literal["cron", "interval", "date"]
CatchUp = Literal["none", "latest", "all"]

# Longest single sleep, in seconds: a suspend or a wall-clock step is noticed within it.
_MAX_SLEEP = 300.0
# Most fire times examined per window while looking for missed ones (bounds start-up work).
_SCAN_LIMIT = 20_000

log = structlog.get_logger("flowerpower_daemon.triggers.timers")


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """One timer: when it fires and how strictly.

    Exactly the field of ``kind`` is set: ``cron`` (5 or 6 fields, seconds
    first, stored normalised to 6), ``every`` or ``date``. ``timezone`` is the
    IANA zone cron expressions and naive datetimes are read in (UTC when
    ``None``). ``start_at`` anchors an interval's grid (``start_at + k*every``)
    and is the earliest fire of a cron trigger. ``jitter`` is the largest
    random delay, in seconds, added to each fire; ``misfire_grace`` (seconds)
    drops a fire that could only happen later than that (``None``: always fire).
    ``catch_up`` and ``max_catch_up`` say which fires missed while the daemon
    was down are run at start-up (see :func:`catch_up_fires`).
    """

    name: str
    kind: TimerKind
    cron: str | None = None
    every: timedelta | None = None
    start_at: datetime | None = None
    date: datetime | None = None
    timezone: str | None = None
    jitter: float = 0.0
    misfire_grace: float | None = None
    catch_up: CatchUp = "latest"
    max_catch_up: int = 100

    def __post_init__(self) -> None:
        tz = parse_timezone(self.timezone)
        given = {"cron": self.cron, "interval": self.every, "date": self.date}
        if self.kind not in given:
            raise ValueError(f"timer {self.name!r}: unknown kind {self.kind!r}")
        if given[self.kind] is None:
            field_name = "every" if self.kind == "interval" else self.kind
            raise ValueError(f"timer {self.name!r}: kind {self.kind!r} needs {field_name!r}")
        extra = [key for key, value in given.items() if key != self.kind and value is not None]
        if extra:
            raise ValueError(f"timer {self.name!r}: kind {self.kind!r} takes no {extra}")
        if self.kind == "date" and self.start_at is not None:
            raise ValueError(f"timer {self.name!r}: a date trigger takes no start_at")
        if self.every is not None and self.every <= timedelta(0):
            raise ValueError(f"timer {self.name!r}: interval {self.every} must be positive")
        if self.jitter < 0:
            raise ValueError(f"timer {self.name!r}: jitter must be >= 0, not {self.jitter}")
        if self.misfire_grace is not None and self.misfire_grace < 0:
            raise ValueError(f"timer {self.name!r}: misfire_grace must be >= 0")
        if self.catch_up not in ("none", "latest", "all"):
            raise ValueError(
                f"timer {self.name!r}: catch_up must be none, latest or all, not {self.catch_up!r}"
            )
        if self.max_catch_up < 1:
            raise ValueError(f"timer {self.name!r}: max_catch_up must be >= 1")
        # Frozen, so normalise through object.__setattr__: a 6-field cron, aware datetimes.
        if self.cron is not None:
            object.__setattr__(self, "cron", parse_cron(self.cron))
        for key in ("start_at", "date"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, parse_date(value, tz))

    @classmethod
    def from_schedule(
        cls,
        name: str,
        schedule: ScheduleConfig,
        *,
        jitter: float = 0.0,
        misfire_grace: float | None = None,
    ) -> TimerSpec:
        """The timer of a pipeline's ``schedule:`` block; ``ValueError`` when it sets none."""
        if schedule.kind is None:
            raise ValueError(f"timer {name!r}: the schedule sets none of cron, interval, date")
        return cls(
            name=name,
            kind=schedule.kind,
            cron=schedule.cron,
            every=schedule.interval,
            date=schedule.date,
            timezone=schedule.timezone,
            jitter=jitter,
            misfire_grace=misfire_grace,
        )


def next_fire(spec: TimerSpec, after: datetime) -> datetime | None:
    """The first fire time (UTC) of ``spec`` strictly after the aware ``after``.

    ``None`` when nothing is left: a date already passed, or a cron
    expression that never matches. Cron DST rules are those of
    :func:`~flowerpower_daemon.project.schedule.next_cron_time` (a skipped
    time fires once when the gap ends, a repeated time once, at its first
    occurrence). An interval without ``start_at`` fires at ``after + every``.
    """
    if after.tzinfo is None:
        raise ValueError(f"next_fire needs an aware datetime, not {after!r}")
    if spec.kind == "date":
        assert spec.date is not None
        return spec.date.astimezone(UTC) if spec.date > after else None
    if spec.kind == "interval":
        assert spec.every is not None
        return next_interval_time(spec.every, after, spec.start_at).astimezone(UTC)
    assert spec.cron is not None
    if spec.start_at is not None and after < spec.start_at:
        after = spec.start_at - timedelta(microseconds=1)
    try:
        return next_cron_time(spec.cron, after, parse_timezone(spec.timezone))
    except CroniterBadDateError:
        return None


def catch_up_fires(spec: TimerSpec, last_fire: datetime | None, now: datetime) -> list[datetime]:
    """The missed fire times of ``spec`` to run at start-up, oldest first (pure).

    Missed are the fire times after ``last_fire`` (the scheduled time of the
    last recorded fire) up to and including ``now``, not older than
    ``misfire_grace`` seconds. ``spec.catch_up`` picks among them: ``none``
    runs none, ``latest`` the most recent one, ``all`` each of them, but at
    most the newest ``max_catch_up``. A cron or interval timer without a
    ``last_fire`` starts fresh: nothing was missed. A date trigger's time is
    missed when it is not after ``now`` and not already fired (``last_fire``
    before it or ``None``).
    """
    if now.tzinfo is None or (last_fire is not None and last_fire.tzinfo is None):
        raise ValueError("catch_up_fires needs aware datetimes")
    if spec.catch_up == "none":
        return []
    oldest = None if spec.misfire_grace is None else now - timedelta(seconds=spec.misfire_grace)
    if spec.kind == "date":
        assert spec.date is not None
        at = spec.date.astimezone(UTC)
        fired = last_fire is not None and last_fire >= at
        in_grace = oldest is None or at >= oldest
        return [at] if at <= now and in_grace and not fired else []
    if last_fire is None:
        return []
    # Fire times t > after (datetime resolution is 1 µs, so t >= oldest is t > oldest - 1 µs).
    after = last_fire if oldest is None else max(last_fire, oldest - timedelta(microseconds=1))
    keep = 1 if spec.catch_up == "latest" else spec.max_catch_up
    return _newest_fires(spec, after, now, keep)


def _newest_fires(spec: TimerSpec, after: datetime, until: datetime, keep: int) -> list[datetime]:
    """The newest ``keep`` fire times in ``(after, until]``, oldest first.

    Scans windows ending at ``until`` that grow fourfold until they hold
    ``keep`` fire times or reach back to ``after``, so a long downtime of a
    frequent timer costs about the fires kept, not every fire missed. At most
    ``_SCAN_LIMIT`` fire times are looked at per window.
    """
    span = timedelta(seconds=1)
    while True:
        start = after if span >= until - after else until - span
        window: deque[datetime] = deque(maxlen=keep)
        fire = next_fire(spec, start)
        scanned = 0
        while fire is not None and fire <= until and scanned < _SCAN_LIMIT:
            window.append(fire)
            scanned += 1
            fire = next_fire(spec, fire)
        if len(window) >= keep or start == after or scanned >= _SCAN_LIMIT:
            return list(window)
        span *= 4


async def timer_events(
    spec: TimerSpec,
    *,
    now: Callable[[], datetime] = utcnow,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    last_fire: datetime | None = None,
    rng: random.Random | None = None,
) -> AsyncGenerator[TriggerEvent, None]:
    """Yield one :class:`TriggerEvent` per fire of ``spec``, sleeping in between.

    ``last_fire`` is the scheduled time of the previous fire (from the timer
    state store): fires missed since then, while the daemon was down, are
    yielded at once as chosen by :func:`catch_up_fires` (``meta`` has
    ``catch_up: True``), then the schedule goes on after ``now()``; an
    interval without ``start_at`` keeps the grid of ``last_fire``. Without it
    cron and interval timers start from ``now()`` (an interval without
    ``start_at`` is anchored there), and a date trigger whose time has passed
    fires once unless older than ``misfire_grace`` or ``catch_up`` is ``none``.

    A fire is yielded at ``scheduled + U(0, jitter)`` with ``at`` the actual
    time and ``meta`` holding ``scheduled`` (ISO string) and ``scheduled_ts``
    (epoch seconds) of the fire without jitter. When the loop wakes after the
    following fire time too (a suspended machine, a stalled consumer), the
    missed fires collapse into this one and the schedule resumes after the
    wake time. A fire later than ``misfire_grace`` is dropped and logged; a
    date trigger then ends without yielding. ``now`` and ``sleep`` are there
    for tests with a fake clock.
    """
    rng = rng or random.Random()
    started = now()
    if spec.kind == "interval" and spec.start_at is None:
        spec = replace(spec, start_at=last_fire if last_fire is not None else started)
    if last_fire is None:
        missed = catch_up_fires(spec, last_fire, started)
    else:  # A long downtime may mean a few thousand cron computations: off the event loop.
        missed = await anyio.to_thread.run_sync(catch_up_fires, spec, last_fire, started)
    if missed:
        log.info(
            "timer_catch_up",
            trigger=spec.name,
            policy=spec.catch_up,
            fires=len(missed),
            last_fire=last_fire.isoformat() if last_fire else None,
            first=missed[0].isoformat(),
            last=missed[-1].isoformat(),
        )
    for fire in missed:
        yield TriggerEvent(
            trigger=spec.name,
            kind=spec.kind,
            at=now(),
            meta={
                "scheduled": fire.isoformat(),
                "scheduled_ts": fire.timestamp(),
                "catch_up": True,
            },
        )
    scheduled = next_fire(spec, started)
    if spec.kind == "date" and last_fire is not None and scheduled is not None:
        scheduled = scheduled if last_fire < scheduled else None
    while scheduled is not None:
        deadline = scheduled + timedelta(seconds=rng.uniform(0.0, spec.jitter))
        await _sleep_until(deadline, now, sleep)
        current = now()
        late = (current - deadline).total_seconds()
        misfire = spec.misfire_grace is not None and late > spec.misfire_grace
        if not misfire:
            # Yielded before anything else is computed (the next fire time is a croniter
            # call for a cron timer): the consumer starts the run as soon as it can.
            yield TriggerEvent(
                trigger=spec.name,
                kind=spec.kind,
                at=current,
                meta={"scheduled": scheduled.isoformat(), "scheduled_ts": scheduled.timestamp()},
            )
        following = next_fire(spec, scheduled)
        skipped = following is not None and following <= current
        if misfire:
            log.warning(
                "timer_misfire",
                trigger=spec.name,
                scheduled=scheduled.isoformat(),
                late_s=round(late, 3),
                misfire_grace=spec.misfire_grace,
            )
        elif skipped:
            log.warning(
                "timer_missed_fires",
                trigger=spec.name,
                scheduled=scheduled.isoformat(),
                woke=current.isoformat(),
            )
        scheduled = next_fire(spec, now()) if skipped else following
    log.info("timer_done", trigger=spec.name)


async def _sleep_until(
    deadline: datetime, now: Callable[[], datetime], sleep: Callable[[float], Awaitable[object]]
) -> None:
    """Sleep until ``now() >= deadline``, in chunks of at most ``_MAX_SLEEP`` seconds."""
    remaining = (deadline - now()).total_seconds()
    if remaining <= 0:
        await anyio.lowlevel.checkpoint()
        return
    while remaining > 0:
        await sleep(min(remaining, _MAX_SLEEP))
        remaining = (deadline - now()).total_seconds()
