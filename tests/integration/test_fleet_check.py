"""With the queue on Redis, trigger policies Redis does not enforce are refused, not ignored;
on the memory queue, timers that every daemon of a shared subscription would fire are a warning."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from control_harness import NO_SYSTEMD, request, socket_of, wait_ready
from daemon_harness import BIN, base_settings, daemon, make_project, unique, write_config

from flowerpower_daemon.service.check import redis_policy_problems
from flowerpower_daemon.settings import Settings

DAEMON = str(BIN / "flowerpower-daemon")
# Nothing listens there: check and a refused start never connect.
REDIS = "redis://127.0.0.1:1/0"
WHY = "is not enforced with queue.broker on Redis (workers run what is enqueued)"


def _config(tmp: Path, queue: str, **trigger: Any) -> Path:
    settings = base_settings(make_project(tmp), tmp, 1)
    settings["queue"] = {"broker": queue}
    settings["triggers"] = [
        {
            "name": "temp",
            "type": "mqtt",
            "pipeline": "temperature",
            "topic": "x/{device}",
            **trigger,
        }
    ]
    return write_config(tmp, settings)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAEMON, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_check_refuses_overlap_skip_on_redis(tmp_path: Path) -> None:
    """`check` exits 2 naming the key, the reason and the way out."""
    config = _config(tmp_path, REDIS, overlap="skip")
    proc = _cli("check", "-c", str(config))
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{config}: triggers[0].overlap: 'skip' {WHY}; use overlap: allow or use the memory queue"
        in proc.stderr
    ), proc.stderr


def test_daemon_start_refuses_the_same(tmp_path: Path) -> None:
    """`run` refuses it too (exit 2) before it connects to anything."""
    config = _config(tmp_path, REDIS, max_concurrent=2)
    proc = _cli("run", "-c", str(config))
    assert proc.returncode == 2, proc.stderr
    assert f"triggers[0].max_concurrent: 2 {WHY}" in proc.stdout + proc.stderr


def test_default_policies_pass_on_redis_and_any_pass_in_memory(tmp_path: Path) -> None:
    """overlap: allow without limits is fine on Redis; every policy is fine in memory."""
    assert _cli("check", "-c", str(_config(tmp_path / "r", REDIS))).returncode == 0
    config = _config(
        tmp_path / "m", "memory", overlap="queue", max_concurrent=1, key="{device}", coalesce=True
    )
    proc = _cli("check", "-c", str(config))
    assert proc.returncode == 0, proc.stderr


def test_every_unenforced_policy_is_named(tmp_path: Path) -> None:
    """One problem per policy and trigger; disabled triggers and debounce are not refused."""
    project = make_project(tmp_path)
    mqtt = {"type": "mqtt", "pipeline": "temperature", "topic": "x/{device}"}
    settings = Settings.model_validate(
        {
            "project": str(project),
            "queue": {"broker": REDIS},
            "triggers": [
                {**mqtt, "name": "a", "overlap": "replace", "max_concurrent": 3},
                {**mqtt, "name": "b", "key": "{device}", "max_concurrent_per_key": 1},
                {**mqtt, "name": "c", "key": "{device}", "coalesce": True},
                {**mqtt, "name": "d", "key": "{device}", "debounce": 0.5},
                {**mqtt, "name": "e", "overlap": "skip", "enabled": False},
                {
                    "name": "f",
                    "type": "interval",
                    "every": "1s",
                    "pipeline": "stats",
                    "overlap": "queue",
                },
            ],
        }
    )
    keys = [p.key for p in redis_policy_problems(settings)]
    assert keys == [
        "triggers[0].overlap",
        "triggers[0].max_concurrent",
        "triggers[1].max_concurrent_per_key",
        "triggers[2].coalesce",
        "triggers[5].overlap",
    ]


async def test_reload_refuses_the_same_and_keeps_running(
    tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    """A reload that adds `overlap: skip` in Redis mode is refused; the old config stays."""
    settings = base_settings(make_project(tmp_path), tmp_path, mosquitto.port)
    settings["queue"] = {"broker": redis_server.url, "queue_name": unique("q")}
    trigger = {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": "x/{device}"}
    settings["triggers"] = [trigger]
    config = write_config(tmp_path, settings)
    with daemon(config, env=NO_SYSTEMD) as proc:
        sock = socket_of(tmp_path / "state")
        wait_ready(sock, proc)
        settings["triggers"] = [{**trigger, "overlap": "skip"}]
        config.write_text(yaml.safe_dump(settings))
        answer = request(sock, "reload", timeout=60)
        assert not answer["ok"], answer
        error = answer["error"]
        assert error["code"] == "reload_failed", error
        [problem] = error["details"]
        assert problem["key"] == "triggers[0].overlap", problem
        assert problem["file"] == str(config), problem  # the file, as `check` names it
        assert problem["message"].startswith(f"'skip' {WHY}"), problem
        assert request(sock, "status")["result"]["state"] == "running"
        assert proc.proc.poll() is None


def _shared(tmp: Path, **extra: Any) -> Path:
    """An MQTT trigger on a shared subscription beside an interval timer, memory queue."""
    settings = base_settings(make_project(tmp), tmp, 1)
    settings.update(extra)
    settings["triggers"] = [
        {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": "x/{device}"},
        {"name": "tick", "type": "interval", "pipeline": "stats", "every": "10s"},
    ]
    settings["triggers"][0]["shared_group"] = "fleet"
    return write_config(tmp, settings)


def test_check_warns_of_timers_every_shared_daemon_would_fire(tmp_path: Path) -> None:
    """A shared subscription with timers on the memory queue passes `check` with a warning
    naming the group, the timers and the way out; ``shared_state`` or a Redis queue end it."""
    config = _shared(tmp_path / "alone")
    proc = _cli("check", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert (
        f"warning: {config}: triggers[0].shared_group: the daemons of shared group 'fleet'"
        " would each fire every tick of the timers (tick); set shared_state:" in proc.stderr
    ), proc.stderr
    for i, extra in enumerate(({"shared_state": REDIS}, {"queue": {"broker": REDIS}})):
        proc = _cli("check", "-c", str(_shared(tmp_path / str(i), **extra)))
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_the_daemon_logs_the_same_warning_at_start(tmp_path: Path) -> None:
    """A daemon started with that config runs, and its log says why every tick would come
    from each daemon (no broker needed: the warning precedes the connect)."""
    with daemon(_shared(tmp_path), env=NO_SYSTEMD) as proc:
        deadline = time.monotonic() + 60
        while '"config_warning"' not in proc.log():
            assert proc.proc.poll() is None, proc.log()[-3000:]
            assert time.monotonic() < deadline, proc.log()[-3000:]
            time.sleep(0.1)
    [line] = [json.loads(x) for x in proc.log().splitlines() if '"config_warning"' in x]
    assert line["level"] == "warning" and line["key"] == "triggers[0].shared_group", line
    assert "would each fire every tick of the timers (tick)" in line["problem"], line


def test_shared_state_is_a_redis_url_beside_the_memory_queue_only(tmp_path: Path) -> None:
    """A bad URL, or ``shared_state`` beside a Redis queue, is an error naming the key."""
    bad = _cli("check", "-c", str(_shared(tmp_path / "bad", shared_state="memory")))
    assert bad.returncode == 2
    assert "shared_state: not a Redis URL 'memory': use redis://" in bad.stderr, bad.stderr
    both = _shared(tmp_path / "both", shared_state=REDIS, queue={"broker": REDIS})
    proc = _cli("check", "-c", str(both))
    assert proc.returncode == 2
    assert "shared_state: the queue is on Redis (queue.broker)" in proc.stderr, proc.stderr
