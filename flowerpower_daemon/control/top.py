"""``flowerpowerctl top``: runs in flight, rates and run latency per pipeline, live.

It asks ``status`` once (the daemon, the runs already in flight), then follows
the ``events`` stream and redraws every interval. On a terminal the view is
redrawn in place (the alternate screen, plain ANSI; ``q`` or Ctrl-C quits and
gives the screen back); elsewhere one plain-text snapshot per interval is
printed, without escape codes, for logs and scripts (``--iterations N`` stops
after N). Nothing is stored in the daemon for it: a ``top`` started later
counts from then on.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, Self

import anyio

from .render import printable, text_table

__all__ = ["Connection", "TopView", "run_top"]


class Connection(Protocol):
    """A control connection as ``client.ControlClient`` is one (passed in: no import cycle)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def call(self, cmd: str, args: Mapping[str, object] | None = None) -> object: ...

    def stream(
        self, cmd: str, args: Mapping[str, object] | None = None
    ) -> AsyncIterator[Mapping[str, object]]: ...


#: Runs that count as in flight (``run_scheduled`` waits for its time: not yet).
_STARTING = frozenset({"run_queued", "run_started", "run_enqueued"})
#: Seconds over which RUNS/S is counted.
RATE_WINDOW_S = 10.0
#: On a terminal, pipeline names are cut to this many characters (a pipe gets them whole).
NAME_WIDTH = 24
#: Finished runs per pipeline whose durations give P50/P95/MAX.
LATENCY_RUNS = 200
_COLUMNS = (
    "pipeline",
    "in flight",
    "done",
    "ok",
    "failed",
    "runs/s",
    "p50 ms",
    "p95 ms",
    "max ms",
    "last",
)


@dataclass
class _Pipeline:
    """What ``top`` counted for one pipeline since it started."""

    in_flight: set[str] = field(default_factory=set)
    ok: int = 0
    failed: int = 0
    last: str = "-"
    finished_at: deque[float] = field(default_factory=deque)
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_RUNS))


class TopView:
    """The counts behind the view: fed ``status`` once and then every event."""

    def __init__(self, socket: str, status: Mapping[str, object], now: float) -> None:
        self.socket = socket
        self.version = str(status.get("version", "?"))
        self.pid = status.get("pid", "?")
        uptime = status.get("uptime_s")
        self._started = now - (float(uptime) if isinstance(uptime, int | float) else 0.0)
        self.events = 0
        self.dropped = 0
        self.note = ""
        self.pipelines: dict[str, _Pipeline] = {}
        active = status.get("active")
        for job in active if isinstance(active, list) else []:
            if isinstance(job, Mapping) and job.get("state") in ("queued", "running"):
                self._pipeline(job.get("pipeline")).in_flight.add(str(job.get("run_id")))

    def _pipeline(self, name: object) -> _Pipeline:
        return self.pipelines.setdefault(str(name), _Pipeline())

    def apply(self, event: Mapping[str, object], now: float) -> None:
        """Count one event of the daemon's stream."""
        self.events += 1
        dropped = event.get("dropped")
        if isinstance(dropped, int):
            self.dropped += dropped
        kind = event.get("type")
        if kind in _STARTING:
            self._pipeline(event.get("pipeline")).in_flight.add(str(event.get("run_id")))
        elif kind == "run_finished":
            p = self._pipeline(event.get("pipeline"))
            p.in_flight.discard(str(event.get("run_id")))
            status = str(event.get("status"))
            if status == "success":
                p.ok += 1
            else:
                p.failed += 1
            p.last = status
            p.finished_at.append(now)
            duration = event.get("duration_ms")
            if isinstance(duration, int | float):
                p.durations.append(float(duration))
        elif isinstance(kind, str) and kind not in ("run_scheduled",):
            self.note = f"{kind} at {str(event.get('time', ''))[11:19]}"

    def rows(self, now: float, name_width: int | None = None) -> list[list[str]]:
        """One row per pipeline seen (name order), then the total; names longer than
        ``name_width`` are cut with ``~`` (on a terminal, so the numbers stay in view)."""
        rows = []
        total = _Pipeline()
        for name, p in sorted(self.pipelines.items()):
            while p.finished_at and p.finished_at[0] < now - RATE_WINDOW_S:
                p.finished_at.popleft()
            rows.append(_row(_fit(name, name_width), p))
            total.in_flight |= p.in_flight
            total.ok += p.ok
            total.failed += p.failed
            total.finished_at.extend(p.finished_at)
            total.durations.extend(p.durations)
        if len(rows) > 1:
            rows.append(_row("(all)", total))
        return rows

    def text(self, now: float, name_width: int | None = None) -> str:
        """The whole view as plain text lines (no escape codes)."""
        up = int(max(0.0, now - self._started))
        clock = datetime.now(UTC).strftime("%H:%M:%S")
        head = (
            f"flowerpower-daemon {self.version}  pid {self.pid}  up {_hms(up)}  "
            f"events {self.events}"
            + (f"  dropped {self.dropped}" if self.dropped else "")
            + f"  {clock} UTC"
        )
        rows = self.rows(now, name_width)
        body = text_table(rows, _COLUMNS) if rows else "(no runs seen yet)\n"
        note = f"last daemon event: {self.note}\n" if self.note else ""
        return f"{head}\n{self.socket}\n\n{body}{note}"


def _fit(name: str, width: int | None) -> str:
    return name if width is None or len(name) <= width else name[: width - 1] + "~"


def _row(name: str, p: _Pipeline) -> list[str]:
    durations = sorted(p.durations)
    return [
        name,
        str(len(p.in_flight)),
        str(p.ok + p.failed),
        str(p.ok),
        str(p.failed),
        f"{len(p.finished_at) / RATE_WINDOW_S:.1f}",
        _ms(_percentile(durations, 0.50)),
        _ms(_percentile(durations, 0.95)),
        _ms(durations[-1] if durations else None),
        p.last,
    ]


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _hms(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"


# ---------------------------------------------------------------- the terminal

_ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
_LEAVE = "\x1b[?25h\x1b[?1049l"
_HOME = "\x1b[H"
_CLEAR_LINE_END, _CLEAR_BELOW = "\x1b[K", "\x1b[J"


@contextmanager
def _screen(tty: bool) -> Iterator[None]:
    """The alternate screen and a terminal that hands single keys over (restored on exit)."""
    if not tty:
        yield
        return
    saved = None
    if sys.stdin.isatty():
        import termios
        import tty as ttymode

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        ttymode.setcbreak(fd)  # keys one by one, no echo; Ctrl-C still interrupts
    sys.stdout.write(_ENTER)
    sys.stdout.flush()
    try:
        yield
    finally:
        sys.stdout.write(_LEAVE)
        sys.stdout.flush()
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _draw(text: str, tty: bool) -> None:
    text = printable(text)
    if tty:
        # Fit the terminal: a line that wrapped, or one more line than the screen has,
        # would scroll the header away and leave the redraw out of step.
        cols, rows = _terminal_size()
        lines = [line[: cols - 1] for line in text.rstrip("\n").split("\n")][: rows - 1]
        sys.stdout.write(_HOME + "".join(f"{line}{_CLEAR_LINE_END}\n" for line in lines))
        sys.stdout.write(f"(q quits){_CLEAR_LINE_END}{_CLEAR_BELOW}")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal on stdout, read at each redraw (it may be resized)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 80, 24
    return max(size.columns, 20), max(size.lines, 4)


async def _keys(quit_scope: anyio.CancelScope) -> None:
    """Quit on ``q`` (the terminal is in cbreak mode)."""
    fd = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, 64)
        if not data or b"q" in data.lower():
            quit_scope.cancel()
            return


async def run_top(
    connect: Callable[[str], Connection],
    path: str,
    *,
    interval: float = 1.0,
    iterations: int | None = None,
) -> int:
    """Show the view until ``q``, Ctrl-C, ``iterations`` snapshots or the daemon leaves.

    Returns 0, or 3 when the daemon closes the stream (it said why in the last line).
    ``connect(path)`` opens a connection (``client.ControlClient``); its errors
    (no daemon to begin with) are the caller's to report.
    """
    tty = sys.stdout.isatty()
    async with connect(path) as client:
        status = await client.call("status")
    view = TopView(path, status if isinstance(status, Mapping) else {}, time.monotonic())
    gone = False
    with _screen(tty):
        async with connect(path) as stream, anyio.create_task_group() as tg:

            async def follow() -> None:
                nonlocal gone
                async for event in stream.stream("events"):
                    view.apply(event, time.monotonic())
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(follow)
            if tty and sys.stdin.isatty():
                tg.start_soon(_keys, tg.cancel_scope)
            shown = 0
            while iterations is None or shown < iterations:
                _draw(view.text(time.monotonic(), NAME_WIDTH if tty else None), tty)
                shown += 1
                if iterations is not None and shown >= iterations:
                    break
                await anyio.sleep(interval)
            tg.cancel_scope.cancel()
    if gone:
        sys.stderr.write("flowerpowerctl top: the daemon closed the connection\n")
        return 3
    return 0
