"""``/``: the status page, plain HTML from what ``flowerpowerctl`` sees.

Pipelines, triggers (last and next fire, counters), runs in flight and the
last 20 finished runs, all read from :class:`~..control.api.DaemonControl`
(and its job history) when the page is asked for: no state of its own but
each trigger's last fire time, which the metrics keep. Every value is
HTML-escaped; the page has no script and refreshes itself every 10 s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape

import structlog

from ..control.api import DaemonControl
from ..state.history import JobRecord
from .metrics import Metrics

__all__ = ["status_page"]

log = structlog.get_logger("flowerpower_daemon.http")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.2em 0 .4em}
p.meta{color:#555;margin:0 0 .8em}
table{border-collapse:collapse;background:#fff;font-size:.9em}
th,td{border:1px solid #ddd;padding:.2em .45em;text-align:left;white-space:nowrap}
th{background:#f0f0f0} td.n{text-align:right}
.success{color:#176d2c}.failed,.timeout{color:#b3261e}.cancelled{color:#8a6d00}
.empty{color:#777;font-style:italic}
"""


async def status_page(control: DaemonControl, metrics: Metrics, *, runs: int = 20) -> str:
    """The whole page as HTML text."""
    st = control.status()
    history = control.history
    recent: list[JobRecord] = []
    empty = "no finished runs yet" if history is not None else "no job history"
    if history is not None:
        try:
            recent = await history.recent(limit=runs)
        except Exception as exc:  # Redis away, say: the rest of the page still helps
            log.warning("status_page_history_failed", error=str(exc))
            empty = "job history unavailable (see the log)"
    triggers = control.triggers()
    by_pipeline: dict[str, list[str]] = {}
    for t in triggers:
        by_pipeline.setdefault(t.cfg.pipeline, []).append(t.cfg.name)
    mqtt = "connected" if st["mqtt"]["connected"] else "disconnected"
    head = " &middot; ".join(
        escape(part, quote=False)
        for part in (
            f"flowerpower-daemon {st['version']}",
            st["state"],
            f"up {_span(st['uptime_s'])}",
            f"MQTT {st['mqtt']['broker']} {mqtt}",
            f"queue {st['queue']['backend']}",
            f"{st['in_flight']} running, {st['counters']['runs_ok']} ok, "
            f"{st['counters']['runs_failed']} failed",
            "times in UTC",
        )
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="10">',
        "<title>flowerpower-daemon</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>flowerpower-daemon</h1>",
        f'<p class="meta">{head}</p>',
        "<h2>Pipelines</h2>",
        _table(
            ["pipeline", "triggers"],
            [
                [name, ", ".join(by_pipeline.get(name, [])) or "-"]
                for name in control.project.pipelines
            ],
            "no pipelines",
        ),
        "<h2>Triggers</h2>",
        _table(
            [
                "trigger",
                "type",
                "pipeline",
                "last fire",
                "next fire",
                "fired",
                "ok",
                "failed",
                "running",
                "paused",
            ],
            [
                [
                    t.cfg.name,
                    t.cfg.type,
                    t.cfg.pipeline,
                    _time(metrics.last_fire(t.cfg.name)),
                    _time(t.next_fire),
                    t.fired,
                    t.ok,
                    t.failed,
                    t.running,
                    "yes" if t.paused else "",
                ]
                for t in triggers
            ],
            "no triggers",
        ),
        "<h2>Runs in flight</h2>",
        _table(
            ["run", "pipeline", "trigger", "state", "started"],
            [
                [
                    s["run_id"],
                    s["pipeline"],
                    s["trigger"]["name"],
                    s["state"],
                    _iso(s["started_at"] or s["queued_at"]),
                ]
                for s in (run.summary() for run in control.active_runs().values())
            ],
            "none",
        ),
        f"<h2>Last {runs} runs</h2>",
        _table(
            ["run", "pipeline", "trigger", "status", "finished", "duration"],
            [
                [
                    r.get("run_id"),
                    r.get("pipeline"),
                    _trigger_name(r.get("trigger")),
                    _Status(str(r.get("state"))),
                    _iso(r.get("finished_at")),
                    _ms(r.get("duration_ms")),
                ]
                for r in recent
            ],
            empty,
        ),
        "</body></html>",
    ]
    return "\n".join(parts)


class _Status(str):
    """A run status: its cell gets the status as class (colour)."""


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], empty: str) -> str:
    out = ["<table><tr>", *(f"<th>{escape(h)}</th>" for h in header), "</tr>"]
    n = 0
    for row in rows:
        n += 1
        cells = []
        for value in row:
            if isinstance(value, _Status):
                cells.append(f'<td class="{escape(value)}">{escape(value)}</td>')
            elif isinstance(value, int | float) and not isinstance(value, bool):
                cells.append(f'<td class="n">{value}</td>')
            else:
                cells.append(f"<td>{escape('' if value is None else str(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    if not n:
        out.append(f'<tr><td class="empty" colspan="{len(header)}">{escape(empty)}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _time(value: datetime | None) -> str:
    """``2026-01-31 12:00:05`` in UTC (the daemon's times are UTC)."""
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: object) -> str:
    if not isinstance(value, str) or not value:
        return "-"
    try:
        return _time(datetime.fromisoformat(value))
    except ValueError:
        return value


def _ms(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _trigger_name(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("name", ""))
    return "" if value is None else str(value)
