"""``flowerpowerctl`` against a real daemon: every command, as a subprocess, over the real socket.

One daemon (real Mosquitto, a copy of examples/sensors plus test pipelines)
serves the module; tests that restart or break a daemon start their own.
"""

from __future__ import annotations

import json
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from control_harness import CTL, NO_SYSTEMD, ctl, ok, ready_daemon, request, wait_ready
from daemon_harness import (
    BIN,
    Config,
    DaemonProcess,
    client,
    collect,
    configure,
    mqtt_trigger,
    online_daemon,
    started,
    unique,
)
from services import MosquittoService


@dataclass
class Live:
    sock: Path
    proc: DaemonProcess
    config: Path
    settings: dict[str, Any]
    port: int

    @property
    def settings_state(self) -> Path:
        return Path(self.settings["state_dir"])


def _config(tmp: Path, port: int) -> Config:
    """An MQTT trigger ``temp`` and an hourly ``tick`` on the test project."""
    triggers = [
        {
            "name": "temp",
            "type": "mqtt",
            "topic": f"{unique('ctl')}/+/t",
            "pipeline": "temperature",
        },
        {"name": "tick", "type": "interval", "every": "1h", "pipeline": "stats"},
    ]
    return configure(tmp, port, triggers)


@pytest.fixture(scope="module")
def live(
    mosquitto_session: MosquittoService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """A running daemon with a control socket, shared by this module's read-mostly tests."""
    config = _config(tmp_path_factory.mktemp("ctl"), mosquitto_session.port)
    with ready_daemon(config) as run:
        yield Live(config.sock, run.proc, config.path, config.settings, config.port)
        assert run.proc.proc.poll() is None, run.proc.log()[-3000:]


def _wait_state(sock: Path, run_id: str, states: tuple[str, ...], timeout: float = 60) -> Any:
    """Poll `job ID` (bounded) until the job is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        job = ok(sock, "job", run_id)
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {run_id} still {job['state']}"
        time.sleep(0.05)


# ------------------------------------------------------------------- info


def test_status_reports_version_mqtt_queue_counters(live: Live) -> None:
    """`status` gives version, uptime, MQTT connection, queue backend and counters."""
    status = ok(live.sock, "status")
    assert status["version"] == "0.1.0"
    assert status["state"] == "running"
    assert status["uptime_s"] > 0
    assert status["mqtt"]["connected"] is True
    assert status["mqtt"]["broker"] == f"127.0.0.1:{live.port}"
    assert status["queue"]["backend"] == "memory"
    assert {"runs_ok", "runs_failed", "messages_in", "results_out"} <= set(status["counters"])
    assert status["in_flight"] == 0


def test_status_human_output(live: Live) -> None:
    """Without --json, `status` prints a readable summary."""
    res = ctl(live.sock, "status", as_json=False)
    assert res.rc == 0, res.err
    assert "flowerpower-daemon 0.1.0" in res.out
    assert "connected" in res.out and "memory" in res.out


def test_pipelines_lists_the_project(live: Live) -> None:
    """`pipelines` lists every pipeline with the triggers that run it."""
    pipelines = {p["name"]: p for p in ok(live.sock, "pipelines")}
    assert {"stats", "temperature", "slow", "broken"} <= set(pipelines)
    assert pipelines["stats"]["triggers"] == ["tick"]
    assert "mean" in pipelines["stats"]["final_vars"]
    table = ctl(live.sock, "pipelines", as_json=False)
    assert table.rc == 0 and "temperature" in table.out


def test_triggers_show_next_fire_paused_and_counters(live: Live) -> None:
    """`triggers` shows each trigger's type, next fire time, pause state and counters."""
    triggers = {t["name"]: t for t in ok(live.sock, "triggers")}
    assert triggers["temp"]["type"] == "mqtt" and triggers["temp"]["next_fire"] is None
    tick = triggers["tick"]
    assert tick["type"] == "interval" and tick["origin"] == "config"
    assert tick["next_fire"] is not None and tick["paused"] is False
    assert {"fired", "ok", "failed", "running"} <= set(tick)


# ------------------------------------------------------------------- runs


def test_run_wait_returns_the_pipeline_outputs(live: Live) -> None:
    """`run --wait` answers when the run is done, with its outputs."""
    res = ctl(
        live.sock,
        "run",
        "stats",
        "--inputs",
        '{"readings": [1, 2, 3]}',
        "--config",
        '{"unused": true}',
        "--wait",
    )
    assert res.rc == 0, res.err
    assert res.out["state"] == "success"
    outputs = res.out["result"]["outputs"]
    assert outputs["mean"] == 2.0 and outputs["count"] == 3 and outputs["alert"] is False
    assert res.out["result"]["trigger"] == {"name": "manual", "type": "manual"}
    human = ctl(
        live.sock,
        "run",
        "temperature",
        "--inputs",
        '{"temperature": 40}',
        "--final-vars",
        '["fahrenheit"]',
        "--wait",
        as_json=False,
    )
    assert human.rc == 0, human.err
    assert "success" in human.out and "104.0" in human.out


def test_control_characters_from_runs_are_shown_not_sent_to_the_terminal(live: Live) -> None:
    """An escape sequence in an output (from a device, say) is printed as ``\\x1b``, not obeyed."""
    evil = "\x1b]0;owned\x07\x1b[2J"
    inputs = json.dumps({"temperature": 40, "device": evil})
    human = ctl(live.sock, "run", "temperature", "--inputs", inputs, "--wait", as_json=False)
    assert human.rc == 0, human.err
    assert "\\x1b]0;owned\\x07\\x1b[2J" in human.out
    assert "\x1b" not in human.out and "\x07" not in human.out


async def test_manual_run_result_is_published_on_mqtt(live: Live) -> None:
    """A `run` from the control socket publishes its result like any other run."""
    topic = live.settings["mqtt"]["result_topic"].format(pipeline="stats")
    async with client(live.port) as c:
        await c.subscribe(topic, qos=1)
        res = await anyio.to_thread.run_sync(
            lambda: ctl(live.sock, "run", "stats", "--inputs", '{"readings": [4]}')
        )
        assert res.rc == 0, res.err
        [(_, message, _)] = await collect(c, topic, 1, timeout=30)
    assert message["run_id"] == res.out["run_id"]
    assert message["outputs"]["mean"] == 4.0


def test_run_wait_failed_run_exits_4(live: Live) -> None:
    """A waited run that fails prints its error and exits with code 4."""
    res = ctl(live.sock, "run", "broken", "--wait")
    assert res.rc == 4, res.err
    assert res.out["state"] == "failed"
    assert res.out["result"]["error"]["type"] == "RuntimeError"


def test_run_returns_job_id_then_job_shows_the_result(live: Live) -> None:
    """`run` prints the job id at once; `job ID` later shows the full result."""
    started = ok(live.sock, "run", "stats", "--inputs", '{"readings": [10, 20]}')
    assert started["state"] == "queued" and len(started["run_id"]) == 32
    job = _wait_state(live.sock, started["run_id"], ("success", "failed"))
    assert job["state"] == "success"
    assert job["result"]["outputs"]["mean"] == 15.0
    assert job["trigger"] == {"name": "manual", "type": "manual"}
    missing = ctl(live.sock, "job", "nope")
    assert missing.rc == 1 and "not_found" in missing.err


def test_jobs_filters_by_pipeline_state_and_limit(live: Live) -> None:
    """`jobs` lists newest first and filters by pipeline, state and count."""
    for _ in range(3):
        ok(live.sock, "run", "stats", "--wait")
    assert ctl(live.sock, "run", "broken", "--wait").rc == 4
    rows = ok(live.sock, "jobs", "--pipeline", "stats", "--state", "success", "--limit", "2")
    assert len(rows) == 2
    assert all(r["pipeline"] == "stats" and r["state"] == "success" for r in rows)
    assert rows[0]["finished_at"] >= rows[1]["finished_at"]
    failed = ok(live.sock, "jobs", "--state", "failed")
    assert failed and all(r["state"] == "failed" for r in failed)
    table = ctl(live.sock, "jobs", "--limit", "3", as_json=False)
    assert table.rc == 0 and "success" in table.out


def test_run_in_then_cancel_while_scheduled(live: Live) -> None:
    """`run --run-in` schedules a job; `cancel` drops it and it is recorded as cancelled."""
    job = ok(live.sock, "run", "stats", "--run-in", "10m")
    assert job["state"] == "scheduled" and job["run_at"]
    scheduled = ok(live.sock, "jobs", "--state", "scheduled")
    assert job["run_id"] in [r["run_id"] for r in scheduled]
    assert ok(live.sock, "cancel", job["run_id"])["state"] == "cancelled"
    again = ctl(live.sock, "cancel", job["run_id"])
    assert again.rc == 1 and "already finished" in again.err
    assert ok(live.sock, "job", job["run_id"])["state"] == "cancelled"
    at = ok(live.sock, "run", "stats", "--run-at", "2099-01-01T00:00:00")
    assert at["state"] == "scheduled" and at["run_at"].startswith("2099-01-01T00:00:00+00:00")
    assert ok(live.sock, "cancel", at["run_id"])["state"] == "cancelled"


def test_cancel_a_running_run(live: Live) -> None:
    """`cancel` stops a running pipeline; the run ends as cancelled."""
    job = ok(live.sock, "run", "slow", "--inputs", '{"seconds": 60}')
    _wait_state(live.sock, job["run_id"], ("running",))
    t0 = time.monotonic()
    assert ok(live.sock, "cancel", job["run_id"])["state"] == "cancelled"
    assert time.monotonic() - t0 < 10
    assert ok(live.sock, "job", job["run_id"])["error"]["type"] == "Cancelled"


def test_run_unknown_pipeline_and_bad_json_fail_cleanly(live: Live) -> None:
    """Errors come back as exit codes: 1 for the daemon's no, 2 for a bad command line."""
    res = ctl(live.sock, "run", "nope")
    assert res.rc == 1 and "not_found" in res.err and "stats" in res.err
    assert ctl(live.sock, "run", "stats", "--inputs", "{not json").rc == 2
    assert ctl(live.sock, "run").rc == 2
    assert ctl(live.sock, "run", "stats", "--run-in", "5m", "--run-at", "2030-01-01").rc == 2


# -------------------------------------------------------------- schedules


def test_schedule_add_list_pause_resume_remove(live: Live) -> None:
    """Dynamic schedules: add, list, refuse duplicates, overwrite, pause, resume, remove."""
    sock = live.sock
    added = ok(
        sock,
        "schedule",
        "add",
        "stats",
        "--interval",
        "1h",
        "--id",
        "hourly",
        "--inputs",
        '{"readings": [7]}',
    )
    assert added["name"] == "hourly" and added["origin"] == "dynamic" and added["next_fire"]
    rows = {r["name"]: r for r in ok(sock, "schedules")}
    assert rows["hourly"]["inputs"] == {"readings": [7]} and "tick" in rows
    dup = ctl(sock, "schedule", "add", "stats", "--cron", "0 * * * *", "--id", "hourly")
    assert dup.rc == 1 and "conflict" in dup.err
    # FlowerPower's cron dict form.
    over = ok(
        sock,
        "schedule",
        "add",
        "stats",
        "--cron",
        '{"hour": 3, "minute": 0}',
        "--id",
        "hourly",
        "--overwrite",
    )
    assert over["type"] == "cron"
    paused = ctl(sock, "pause", "hourly", as_json=False)
    assert (paused.rc, paused.out) == (0, "paused: hourly\n")
    triggers = {t["name"]: t for t in ok(sock, "triggers")}
    assert triggers["hourly"]["paused"] is True and triggers["hourly"]["next_fire"] is None
    resumed = ctl(sock, "resume", "hourly", as_json=False)
    assert (resumed.rc, resumed.out) == (0, "resumed: hourly\n")
    assert set(ok(sock, "pause", "--all")["paused"]) >= {"temp", "tick", "hourly"}
    assert all(t["paused"] for t in ok(sock, "triggers"))
    ok(sock, "resume", "--all")
    assert not any(t["paused"] for t in ok(sock, "triggers"))
    assert ok(sock, "schedule", "rm", "hourly") == {"removed": "hourly"}
    assert "hourly" not in {r["name"] for r in ok(sock, "schedules")}
    assert ctl(sock, "schedule", "rm", "hourly").rc == 1
    config_owned = ctl(sock, "schedule", "rm", "tick")
    assert config_owned.rc == 1 and "config" in config_owned.err
    assert ctl(sock, "pause", "nope").rc == 1


def test_schedule_add_rejects_bad_values(live: Live) -> None:
    """A bad cron, an unknown pipeline or an unknown input is refused with a reason."""
    bad_cron = ctl(live.sock, "schedule", "add", "stats", "--cron", "not a cron")
    assert bad_cron.rc == 1 and "invalid" in bad_cron.err
    unknown = ctl(live.sock, "schedule", "add", "nope", "--interval", "1h")
    assert unknown.rc == 1 and "not_found" in unknown.err
    bad_input = ctl(
        live.sock, "schedule", "add", "stats", "--interval", "1h", "--inputs", '{"nonsense": 1}'
    )
    assert bad_input.rc == 1 and "nonsense" in bad_input.err
    assert ctl(live.sock, "schedule", "add", "stats").rc == 2  # no --cron/--interval/--date


async def test_interval_schedule_fires_and_date_schedule_runs_once(live: Live) -> None:
    """A dynamic interval schedule fires; a one-shot date schedule runs once, then is gone."""
    topic = live.settings["mqtt"]["result_topic"].format(pipeline="stats")
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    means: list[float] = []
    async with client(live.port) as c:
        await c.subscribe(topic, qos=1)
        # An interval schedule `fast` with readings [100], a one-shot date `once` with [200].
        for kind, when, name, reading in (
            ("--interval", "1s", "fast", 100),
            ("--date", soon, "once", 200),
        ):
            inputs = f'{{"readings": [{reading}]}}'
            add = ("schedule", "add", "stats", kind, when, "--id", name, "--inputs", inputs)
            await anyio.to_thread.run_sync(ok, live.sock, *add)
        try:
            with anyio.fail_after(60):
                while not (100.0 in means and 200.0 in means):
                    [(_, message, _)] = await collect(c, topic, 1, timeout=60)
                    means.append(message["outputs"]["mean"])
        finally:
            await anyio.to_thread.run_sync(lambda: ok(live.sock, "schedule", "rm", "fast"))
    assert means.count(200.0) == 1
    with anyio.fail_after(30):
        while "once" in {r["name"] for r in ok(live.sock, "schedules")}:  # noqa: ASYNC110
            await anyio.sleep(0.1)


def test_run_and_schedule_add_take_run_options(live: Live) -> None:
    """`run` and `schedule_add` take a `run` object of trigger-style overrides (validated
    the same way, persisted with the schedule); `schedule_add` takes FlowerPower's cron and
    interval dict forms and an interval in seconds."""
    answer = request(
        live.sock,
        "run",
        {
            "pipeline": "stats",
            "inputs": {"readings": [1, 3]},
            "run": {"final_vars": ["mean"]},
            "wait": True,
        },
        timeout=60,
    )
    assert answer["ok"], answer
    assert answer["result"]["state"] == "success"
    assert set(answer["result"]["result"]["outputs"]) == {"mean"}
    # final_vars as its own argument wins over the one in `run`.
    both = request(
        live.sock,
        "run",
        {
            "pipeline": "stats",
            "run": {"final_vars": ["mean"], "max_retries": 1},
            "final_vars": ["count"],
            "wait": True,
        },
        timeout=60,
    )
    assert both["ok"] and set(both["result"]["result"]["outputs"]) == {"count"}, both
    typo = request(live.sock, "run", {"pipeline": "stats", "run": {"finl_vars": ["mean"]}})
    assert typo["error"]["code"] == "invalid"
    assert "finl_vars" in typo["error"]["message"] and "final_vars" in typo["error"]["message"]
    negative = request(live.sock, "run", {"pipeline": "stats", "run": {"max_retries": -1}})
    assert negative["error"]["code"] == "invalid" and "max_retries" in negative["error"]["message"]

    def add(**args: Any) -> Any:
        return request(live.sock, "schedule_add", {"pipeline": "stats", **args})

    cron = add(id="cron-dict", cron={"minute": "*/5", "hour": "3"}, run={"final_vars": ["count"]})
    assert cron["ok"], cron
    assert cron["result"]["spec"] == "0 */5 3 * * *" and cron["result"]["origin"] == "dynamic"
    every = add(id="every-dict", interval={"minutes": 5})
    assert every["ok"] and every["result"]["spec"] == "every 0:05:00", every
    seconds = add(id="every-number", interval=90)
    assert seconds["ok"] and seconds["result"]["spec"] == "every 0:01:30", seconds
    bad_field = add(id="bad", cron={"minutes": "*/5"})
    assert bad_field["error"]["code"] == "invalid" and "minutes" in bad_field["error"]["message"]
    bad_run = add(id="bad", interval="1h", run={"executor": {"type": "nope"}})
    assert bad_run["error"]["code"] == "invalid" and "executor" in bad_run["error"]["message"]
    try:
        stored = json.loads((live.settings_state / "schedules.json").read_text())
        by_id = {row["id"]: row for row in stored["schedules"]}
        assert by_id["cron-dict"]["run"] == {"final_vars": ["count"]}
        assert by_id["every-dict"]["run"] == {}
    finally:
        for sid in ("cron-dict", "every-dict", "every-number"):
            ok(live.sock, "schedule", "rm", sid)


# --------------------------------------------------------------- reload etc


def test_reload_applies_changes_and_refuses_a_broken_config(live: Live) -> None:
    """`reload` applies a changed config; a broken one is refused and the old one keeps running."""
    original = live.config.read_text()
    try:
        changed = yaml.safe_load(original)
        changed["triggers"][1]["every"] = "30m"
        changed["triggers"].append(
            {"name": "extra", "type": "cron", "cron": "0 4 * * *", "pipeline": "stats"}
        )
        live.config.write_text(yaml.safe_dump(changed))
        report = ok(live.sock, "reload")
        assert report["added"] == ["extra"] and report["changed"] == ["tick"]
        assert report["removed"] == [] and report["restart_required"] == []
        triggers = {t["name"]: t for t in ok(live.sock, "triggers")}
        assert "extra" in triggers and "0:30:00" in triggers["tick"]["spec"]

        broken = dict(
            changed,
            triggers=[
                {"name": "bad", "type": "cron", "cron": "nope", "pipeline": "stats"},
                {"name": "ghost", "type": "interval", "every": "1h", "pipeline": "missing"},
            ],
        )
        live.config.write_text(yaml.safe_dump(broken))
        res = ctl(live.sock, "reload")
        assert res.rc == 1 and "reload_failed" in res.err
        assert "cron" in res.err
        assert {t["name"] for t in ok(live.sock, "triggers")} >= {"temp", "tick", "extra"}
        assert ok(live.sock, "run", "stats", "--wait")["state"] == "success"
    finally:
        live.config.write_text(original)
        ok(live.sock, "reload")
    assert {t["name"] for t in ok(live.sock, "triggers")} == {"temp", "tick"}


def test_reload_picks_up_new_and_changed_pipeline_code(live: Live) -> None:
    """`reload` finds a new pipeline module and runs the new code after it changes."""
    module = Path(live.settings["project"]) / "pipelines" / "ver.py"
    try:
        module.write_text('def version() -> int:\n    """v1"""\n    return 1\n')
        assert "ver" in ok(live.sock, "reload")["pipelines_added"]
        first = ok(live.sock, "run", "ver", "--wait")
        assert first["result"]["outputs"] == {"version": 1}
        module.write_text('def version() -> int:\n    """v2"""\n    return 2\n')
        shown = ctl(live.sock, "reload", as_json=False)
        # No trigger changed, yet the user is told the edited pipeline was read again.
        assert shown.rc == 0 and "reloaded: triggers added -  removed -  changed -" in shown.out
        assert "ver" in shown.out.split("pipelines: ")[1].split(" (re-read;")[0], shown.out
        second = ok(live.sock, "run", "ver", "--wait")
        assert second["result"]["outputs"] == {"version": 2}
    finally:
        module.unlink(missing_ok=True)
        ok(live.sock, "reload")
    assert "ver" not in {p["name"] for p in ok(live.sock, "pipelines")}


async def test_reload_subscribes_to_new_mqtt_topics(live: Live) -> None:
    """A trigger added by `reload` on a new MQTT topic receives messages at once."""
    original = live.config.read_text()
    tag = live.settings["mqtt"]["client_id"]
    changed = yaml.safe_load(original)
    changed["triggers"].append(
        {
            "name": "late",
            "type": "mqtt",
            "topic": f"{tag}/late/{{device}}",
            "pipeline": "temperature",
        }
    )
    results = live.settings["mqtt"]["result_topic"].format(pipeline="temperature")
    try:
        live.config.write_text(yaml.safe_dump(changed))
        report = await anyio.to_thread.run_sync(lambda: ok(live.sock, "reload"))
        assert report["added"] == ["late"]
        async with client(live.port) as c:
            await c.subscribe(results, qos=1)
            await c.publish(f"{tag}/late/dev7", b'{"temperature": 12.5}', qos=1)
            [(_, message, _)] = await collect(c, results, 1, timeout=30)
        assert message["trigger"]["name"] == "late"
        assert message["outputs"]["device_id"] == "dev7"
    finally:
        live.config.write_text(original)
        await anyio.to_thread.run_sync(lambda: ok(live.sock, "reload"))


def test_events_streams_run_events_until_interrupted(live: Live) -> None:
    """`events` prints one JSON line per event as runs happen; Ctrl-C ends it with exit 0."""
    cmd = [str(CTL), "--socket", str(live.sock), "--json", "events"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            # The stream starts when `events` has subscribed, which may be in the middle
            # of the first run: wait for a run whose start and finish both came.
            while (finished := _streamed_run(seen)) is None:
                assert time.monotonic() < deadline, seen
                ok(live.sock, "run", "stats", "--wait")
                # Read what has arrived, without blocking on a quiet stream.
                while select.select([proc.stdout], [], [], 0.5)[0]:
                    line = proc.stdout.readline()
                    if not line:
                        break
                    seen.append(json.loads(line))
            assert finished["pipeline"] == "stats" and finished["status"] == "success"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def _streamed_run(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``run_finished`` event of a run whose ``run_started`` was streamed too."""
    started = {e["run_id"] for e in events if e["type"] == "run_started"}
    return next((e for e in events if e["type"] == "run_finished" and e["run_id"] in started), None)


# ------------------------------------------------------------- the client


def test_usage_and_unreachable_exit_codes(tmp_path: Path) -> None:
    """Bad command lines exit 2; a socket nobody serves exits 3."""
    assert ctl(tmp_path / "none.sock", "status").rc == 3
    assert ctl(tmp_path / "none.sock", "frobnicate").rc == 2
    assert subprocess.run([str(CTL), "--help"], capture_output=True, timeout=60).returncode == 0


def test_ctl_imports_no_heavy_libraries(live: Live) -> None:
    """The console script, tables included, imports no Hamilton, taskiq, pydantic, pandas."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(CTL), "--socket", str(live.sock), "triggers"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert proc.stdout.decode().split()[0] == "TRIGGER"  # the table really was rendered
    assert not modules & {
        "rich",
        "hamilton",
        "taskiq",
        "pydantic_settings",
        "pandas",
        "numpy",
        "pydantic",
        "structlog",
        "aiomqtt",
    }


def _imports(*args: str) -> set[str]:
    """Modules a Python command imports (``-X importtime``)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return {
        line.split("|")[-1].strip()
        for line in proc.stderr.decode().splitlines()
        if line.startswith("import time:")
    }


def _timed(cmd: list[str], runs: int) -> tuple[float, float]:
    """Median wall time and mean CPU time (user + sys) of running ``cmd``."""
    walls = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, timeout=60, check=True)
        walls.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return statistics.median(walls), cpu / runs


def test_ctl_answers_fast(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket round trip takes milliseconds; ctl loads barely more than anyio itself."""
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert request(live.sock, "status")["ok"]
        samples.append(time.perf_counter() - t0)
    assert statistics.median(samples) < 0.05
    # What any anyio CLI pays for; the ctl may add only its own small modules on top.
    floor = "import argparse, asyncio, anyio, orjson; argparse.ArgumentParser()"
    extra = _imports(str(CTL), "--socket", str(live.sock), "--json", "status") - _imports(
        "-c", floor
    )
    own = {m.split(".")[0] for m in extra if not m.startswith(("anyio.", "flowerpower_daemon"))}
    assert own <= {"sniffio", "typing_extensions", "queue", "_queue"}, own
    assert {m for m in extra if m.startswith("flowerpower_daemon")} <= {
        "flowerpower_daemon",
        "flowerpower_daemon.errors",
        "flowerpower_daemon.control",
        "flowerpower_daemon.control.client",
        "flowerpower_daemon.control.protocol",
        "flowerpower_daemon.control.render",
        "flowerpower_daemon.control.completion",  # stdlib only: argcomplete loads on a TAB
        "flowerpower_daemon.argtypes",  # stdlib + orjson argparse helpers shared with the CLI
        "flowerpower_daemon.version",  # __version__ alone, readable from any layer
    }
    # Timings swing with the machine's load and page cache: reported, not asserted.
    floor_wall, floor_cpu = _timed([sys.executable, "-c", floor], 5)
    wall, cpu = _timed([str(CTL), "--socket", str(live.sock), "--json", "status"], 5)
    with capsys.disabled():
        print(
            f"\n[ctl] socket round trip p50 {statistics.median(samples) * 1000:.2f} ms; "
            f"flowerpowerctl --json status: wall p50 {wall * 1000:.0f} ms, cpu {cpu * 1000:.0f} ms"
            f" (python importing anyio + orjson: wall {floor_wall * 1000:.0f} ms,"
            f" cpu {floor_cpu * 1000:.0f} ms)"
        )


# ------------------------------------------------- a daemon of one's own


def test_schedule_and_pause_survive_a_restart(
    mosquitto_session: MosquittoService, tmp_path: Path
) -> None:
    """Dynamic schedules and pause state live in the state dir and come back after a restart."""
    config = _config(tmp_path, mosquitto_session.port)
    sock = config.sock
    with ready_daemon(config) as run:
        ok(
            sock,
            "schedule",
            "add",
            "stats",
            "--cron",
            "*/5 * * * *",
            "--id",
            "keep",
            "--inputs",
            '{"readings": [1]}',
        )
        ok(sock, "pause", "keep")
        ok(sock, "pause", "tick")
        job = ok(sock, "run", "stats", "--wait")
        stopped = ok(sock, "stop")
        assert stopped == {
            "stopping": True,
            "pid": run.proc.proc.pid,
            "client_id": config.settings["mqtt"]["client_id"],
            "leave": False,
        }
        assert run.proc.wait(60) == 0
    assert not sock.exists()
    with ready_daemon(config) as run:
        rows = {r["name"]: r for r in ok(sock, "schedules")}
        assert rows["keep"]["origin"] == "dynamic" and rows["keep"]["spec"] == "0 */5 * * * *"
        assert rows["keep"]["paused"] is True and rows["tick"]["paused"] is True
        assert rows["keep"]["inputs"] == {"readings": [1]}
        assert ok(sock, "job", job["run_id"])["state"] == "success"  # history survived too
        gone = ctl(sock, "--timeout", "60", "stop", "--wait", as_json=False)
        assert gone.rc == 0 and gone.out.splitlines()[-1] == "stopped", gone
        assert run.proc.proc.poll() == 0  # exited by the time `stop --wait` returned


def test_request_without_a_matching_trigger_says_so(live: Live) -> None:
    """`flowerpower-daemon request` to a topic no trigger matches: one line naming the topic."""
    proc = subprocess.run(
        [
            str(BIN / "flowerpower-daemon"),
            "request",
            "nobody/listens/here",
            '{"x": 1}',
            "--url",
            f"mqtt://127.0.0.1:{live.port}",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: published to 'nobody/listens/here'")
    assert "no trigger matches" in line and "reply_to topic 'flowerpower/replies/" in line


async def test_delayed_run_survives_a_restart(
    mosquitto_session: MosquittoService, tmp_path: Path
) -> None:
    """A `run --run-in` whose daemon stops before its time is not recorded as cancelled: the
    next daemon runs it (at once, its time having passed) and publishes its result."""
    config = _config(tmp_path, mosquitto_session.port)
    sock = config.sock
    topic = config.settings["mqtt"]["result_topic"].format(pipeline="stats")
    async with client(mosquitto_session.port) as c:
        await c.subscribe(topic, qos=1)
        with started(config, env=NO_SYSTEMD) as run:
            await anyio.to_thread.run_sync(wait_ready, sock, run.proc)
            job = await anyio.to_thread.run_sync(
                lambda: ok(sock, "run", "stats", "--inputs", '{"readings": [21]}', "--run-in", "5s")
            )
            assert job["state"] == "scheduled"
            run.proc.signal(signal.SIGTERM)
            assert await anyio.to_thread.run_sync(run.proc.wait, 60) == 0
        with started(config, env=NO_SYSTEMD) as run:
            [(_, message, _)] = await collect(c, topic, 1, timeout=90)
            assert message["run_id"] == job["run_id"], message
            assert message["outputs"]["mean"] == 21.0
            assert "delayed_run_resumed" in run.proc.log()
            assert job["run_id"] in run.proc.log()
            await anyio.to_thread.run_sync(wait_ready, sock, run.proc)
            record = await anyio.to_thread.run_sync(
                lambda: _wait_state(sock, job["run_id"], ("success", "failed", "cancelled"))
            )
            assert record["state"] == "success"
            stored = json.loads((tmp_path / "state" / "schedules.json").read_text())
            assert stored["delayed"] == []
            run.proc.signal(signal.SIGTERM)
            assert await anyio.to_thread.run_sync(run.proc.wait, 60) == 0


async def test_status_names_the_pipelines_a_reload_leaves(tmp_path: Path, mosquitto: Any) -> None:
    """The retained status lists the project's pipelines: after a reload that deleted one, it
    is said again without it, and the ``offline`` said at the stop does not name it either."""
    config = configure(tmp_path, mosquitto.port, [mqtt_trigger("t", "temperature", unique("s"))])
    project = Path(config.settings["project"])
    async with online_daemon(config) as d:
        (project / "conf" / "pipelines" / "broken.yml").unlink(missing_ok=True)
        (project / "pipelines" / "broken.py").unlink()
        report = await anyio.to_thread.run_sync(lambda: request(config.sock, "reload"))
        assert report["ok"] and report["result"]["pipelines_removed"] == ["broken"], report
        again = await d.next_message(config.status_topic, timeout=30)
        assert again.data["status"] == "online" and "broken" not in again.data["pipelines"]
        assert "temperature" in again.data["pipelines"]
    async with client(config.port) as c:
        await c.subscribe(config.status_topic, qos=1)
        with anyio.fail_after(30):
            async for message in c.messages:
                last = json.loads(bytes(message.payload))
                break
    assert last["status"] == "offline" and "broken" not in last["pipelines"], last
