"""How ``flowerpowerctl`` prints answers: plain text tables for people, JSON for scripts.

Standard library and orjson only (no rich): it must work after a plain
install and start fast. ``flowerpower-daemon``'s tables use :func:`text_table` too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import orjson

__all__ = ["dump", "event", "printable", "problem", "result", "text_table"]

_RUN_OK, _RUN_FAILED = 0, 4

#: C0 and C1 control characters but newline and tab, and DEL, as visible escapes.
_CONTROLS = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)
}


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` instead of sent to the terminal.

    Topics, pipeline names, error messages and outputs come from devices and
    pipeline code: an escape sequence among them would otherwise drive the
    user's terminal (retitle it, move the cursor, hide lines).
    """
    return text.translate(_CONTROLS)


def _out(text: str) -> None:
    sys.stdout.write(printable(text) + "\n")


def _err(text: str) -> None:
    sys.stderr.write(printable(text) + "\n")


def dump(value: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def problem(item: object) -> str:
    if isinstance(item, Mapping):
        where = ": ".join(str(item[k]) for k in ("file", "key") if item.get(k))
        return f"{where}: {item.get('message', '')}" if where else str(item.get("message", item))
    return str(item)


def event(item: Mapping[str, object], as_json: bool) -> None:
    """One line per event."""
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    else:
        fields = " ".join(
            f"{k}={_cell(v)}"
            for k, v in item.items()
            if k not in ("type", "time") and v is not None
        )
        line = f"{item.get('time', '')}  {item.get('type', '?'):<14} {fields}"
        sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()


def result(cmd: str, args: Mapping[str, object], value: object, as_json: bool) -> int:
    """Print one command's result; the exit code follows a waited run's status.

    An answer of another shape than the command's printer expects is printed
    as :func:`_generic` does.
    """
    code = _RUN_OK
    if cmd == "run" and isinstance(value, Mapping) and "result" in value:
        code = _RUN_OK if value.get("state") == "success" else _RUN_FAILED
    if as_json:
        dump(value)
        return code
    if isinstance(value, Mapping) and cmd in _OBJECT_PRINTERS:
        _OBJECT_PRINTERS[cmd](value)
    elif isinstance(value, list) and cmd in _LIST_PRINTERS:
        _LIST_PRINTERS[cmd](_rows(value))
    else:
        _generic(value)
    return code


# ----------------------------------------------------------------- printers


def text_table(rows: Sequence[Sequence[str]], headers: Sequence[str], indent: str = "") -> str:
    """Rows of cells as aligned columns under upper-case ``headers`` (one string, final newline)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = [[h.upper() for h in headers], *rows]
    return "".join(
        indent
        + "  ".join(
            cell.replace("\n", " ").ljust(w) for cell, w in zip(line, widths, strict=True)
        ).rstrip()
        + "\n"
        for line in lines
    )


def _table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> None:
    if not rows:
        _out("(none)")
        return
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    sys.stdout.write(printable(text_table(cells, [header for _, header in columns])))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping) and "name" in value and "type" in value:
        return f"{value['name']} ({value['type']})"
    if isinstance(value, Mapping) and "message" in value:
        return f"{value.get('type', 'error')}: {value['message']}"
    if isinstance(value, Mapping | list):
        return orjson.dumps(value).decode()
    return str(value)


def _mapping(value: object) -> Mapping[str, object]:
    """A nested object of an answer (empty when it is not one)."""
    return value if isinstance(value, Mapping) else {}


def _rows(value: object) -> list[Mapping[str, object]]:
    """The objects of a list in an answer (other items left out)."""
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []


def _names(value: object) -> str:
    """A list of names as ``a, b`` (empty when there are none)."""
    return ", ".join(map(str, value)) if isinstance(value, list) else ""


def _status(v: Mapping[str, object]) -> None:
    mqtt, queue, counters = _mapping(v["mqtt"]), _mapping(v["queue"]), _mapping(v["counters"])
    lines = [
        f"flowerpower-daemon {v['version']}  pid {v['pid']}  {v['state']}, "
        f"up {_duration(v['uptime_s'])}",
        f"config     {v.get('config') or '-'}",
        f"project    {v['project']}",
        f"mqtt       {mqtt['broker']} as {mqtt.get('client_id', '?')}"
        f"  {'connected' if mqtt['connected'] else 'DISCONNECTED'}"
        f"  (connects {mqtt['connects']}, outbox {mqtt['outbox']}, published {mqtt['published']})",
        f"queue      {queue['backend']}"
        + (f"  {queue['broker']}" if queue["broker"] != queue["backend"] else "")
        + (f"  (timers shared in {queue['shared_state']})" if queue.get("shared_state") else ""),
        f"pipelines  {v['pipelines']}   triggers {v['triggers']}   paused "
        f"{_names(v['paused']) or '-'}",
        "counters   " + "  ".join(f"{k} {n}" for k, n in counters.items()),
        f"in flight  {v['in_flight']}",
    ]
    workers = _rows(v.get("workers"))
    if queue.get("backend") == "redis" and not workers:
        lines.append("workers    none live")
    _out("\n".join(lines))
    if workers:
        _table(
            [{**w, "last_seen": f"{_number(w.get('age_s')):.1f} s ago"} for w in workers],
            [
                ("name", "WORKER"),
                ("in_flight", "IN FLIGHT"),
                ("done", "DONE"),
                ("concurrency", "CONC"),
                ("last_seen", "LAST SEEN"),
            ],
        )
    if v["active"]:
        _jobs(_rows(v["active"]))
    fleet = _mapping(v.get("fleet"))
    if fleet:
        _out(f"fleet      {fleet.get('topic')} (retained statuses)")
        daemons = [
            {**d, "client_id": f"{d.get('client_id')}{' (this)' if d.get('self') else ''}"}
            for d in _rows(fleet.get("daemons"))
        ]
        _table(
            daemons,
            [
                ("client_id", "DAEMON"),
                ("status", "STATUS"),
                ("host", "HOST"),
                ("pid", "PID"),
                ("version", "VERSION"),
            ],
        )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _duration(seconds: object) -> str:
    s = int(seconds) if isinstance(seconds, int | float) else 0
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _pipelines(v: Sequence[Mapping[str, object]]) -> None:
    _table(
        v,
        [
            ("name", "PIPELINE"),
            ("schedule", "SCHEDULE"),
            ("triggers", "TRIGGERS"),
            ("executor", "EXECUTOR"),
            ("final_vars", "FINAL VARS"),
        ],
    )


def _triggers(v: Sequence[Mapping[str, object]]) -> None:
    _table(
        v,
        [
            ("name", "TRIGGER"),
            ("type", "TYPE"),
            ("pipeline", "PIPELINE"),
            ("spec", "WHEN"),
            ("origin", "FROM"),
            ("paused", "PAUSED"),
            ("next_fire", "NEXT FIRE"),
            ("fired", "FIRED"),
            ("ok", "OK"),
            ("failed", "FAILED"),
            ("running", "RUNNING"),
        ],
    )


def _schedules(v: Sequence[Mapping[str, object]]) -> None:
    _table(
        v,
        [
            ("name", "ID"),
            ("pipeline", "PIPELINE"),
            ("type", "KIND"),
            ("spec", "WHEN"),
            ("origin", "FROM"),
            ("paused", "PAUSED"),
            ("next_fire", "NEXT FIRE"),
            ("inputs", "INPUTS"),
        ],
    )


def _jobs(v: Sequence[Mapping[str, object]]) -> None:
    rows = [{**r, "when": r.get("finished_at") or r.get("run_at") or r.get("queued_at")} for r in v]
    _table(
        rows,
        [
            ("run_id", "JOB"),
            ("pipeline", "PIPELINE"),
            ("trigger", "TRIGGER"),
            ("state", "STATE"),
            ("when", "TIME"),
            ("duration_ms", "MS"),
            ("attempts", "TRIES"),
            ("error", "ERROR"),
        ],
    )


def _job(v: Mapping[str, object]) -> None:
    for key in (
        "run_id",
        "pipeline",
        "trigger",
        "state",
        "queued_at",
        "run_at",
        "started_at",
        "finished_at",
        "duration_ms",
        "attempts",
        "error",
    ):
        if key in v:
            _out(f"{key:<12} {_cell(v[key])}")
    res = v.get("result")
    if isinstance(res, Mapping) and res.get("outputs"):
        _outputs(res["outputs"])


def _outputs(outputs: Mapping[str, object]) -> None:
    _table(
        [{"output": k, "value": _cell(val)} for k, val in outputs.items()],
        [("output", "OUTPUT"), ("value", "VALUE")],
    )


def _run(v: Mapping[str, object]) -> None:
    res = v.get("result")
    if not isinstance(res, Mapping):
        when = f" at {v['run_at']}" if v.get("run_at") else ""
        _out(f"{v['run_id']}  {v['state']}{when}")
        return
    _out(
        f"{res.get('pipeline')}: {res.get('status')} in {res.get('duration_ms')} ms "
        f"({res.get('attempts')} attempt(s)), run {v['run_id']}"
    )
    if res.get("outputs"):
        _outputs(res["outputs"])
    if res.get("error"):
        _err(f"error: {_cell(res['error'])}")


def _generic(v: object) -> None:
    if (
        isinstance(v, Mapping)
        and len(v) <= 4
        and all(not isinstance(x, Mapping | list) for x in v.values())
    ):
        _out("  ".join(f"{k}: {_cell(x)}" for k, x in v.items()))
    else:
        dump(v)


def _reload(v: Mapping[str, object]) -> None:
    _out(
        "reloaded: triggers "
        + "  ".join(f"{k} {_names(v.get(k)) or '-'}" for k in ("added", "removed", "changed"))
    )
    # Every pipeline is read again, so an edited module runs from now on, listed or not.
    _out(
        f"pipelines: {_names(v.get('pipelines')) or '-'} (re-read;"
        f" added {_names(v.get('pipelines_added')) or '-'},"
        f" removed {_names(v.get('pipelines_removed')) or '-'})"
    )
    if v.get("restart_required"):
        _out(f"restart needed for: {_names(v['restart_required'])}")


def _paused(verb: str) -> Callable[[Mapping[str, object]], None]:
    def show(v: Mapping[str, object]) -> None:
        names = _names(v.get(verb))
        _out(f"{verb}: {names}" if names else f"{verb}: nothing (no such trigger)")

    return show


#: Printers of the commands that answer with one object.
_OBJECT_PRINTERS: dict[str, Callable[[Mapping[str, object]], None]] = {
    "pause": _paused("paused"),
    "resume": _paused("resumed"),
    "status": _status,
    "job": _job,
    "run": _run,
    "reload": _reload,
    "schedule_add": lambda v: _schedules([v]),
}
#: Printers of the commands that answer with a list of objects.
_LIST_PRINTERS: dict[str, Callable[[Sequence[Mapping[str, object]]], None]] = {
    "pipelines": _pipelines,
    "triggers": _triggers,
    "schedules": _schedules,
    "jobs": _jobs,
}
