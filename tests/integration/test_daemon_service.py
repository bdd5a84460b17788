"""The service around the pipelines: secrets in logs, paths relative to the config file,
which problems stop the daemon. Real daemons, workers, Mosquitto and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from control_harness import NO_SYSTEMD, ok, wait_ready
from daemon_harness import (
    BIN,
    base_settings,
    client,
    collect,
    daemon,
    make_project,
    unique,
    wait_online,
    write_config,
)
from services import MosquittoService, RedisService

from flowerpower_daemon.errors import ConfigProblem
from flowerpower_daemon.redact import redact_url
from flowerpower_daemon.service.check import split_problems

pytestmark = pytest.mark.timeout(300)


async def test_passwords_in_urls_never_reach_the_logs(
    tmp_path: Path,
    mosquitto: MosquittoService,
    redis_factory: Callable[..., RedisService],
) -> None:
    """A password in queue.broker and mqtt.url is in no log line of the daemon or the worker,
    nor in `flowerpowerctl status`; runs still go through the password-protected Redis."""
    password = unique("Pw9")
    redis = redis_factory(password=password)
    assert password in redis.url
    s = base_settings(make_project(tmp_path), tmp_path, mosquitto.port)
    s["mqtt"]["url"] = f"mqtt://fp:{password}@127.0.0.1:{mosquitto.port}"
    s["log_level"] = "DEBUG"
    s["queue"] = {"broker": redis.url, "queue_name": unique("q")}
    prefix = unique("sec")
    s["triggers"] = [
        {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": f"{prefix}/{{device}}"}
    ]
    tag = s["mqtt"]["client_id"]
    config = write_config(tmp_path, s)
    with (
        daemon(config, env=NO_SYSTEMD) as proc,
        daemon(config, command="worker", env=NO_SYSTEMD) as worker,
    ):
        async with client(mosquitto.port) as c:
            await wait_online(c, f"{tag}/status", proc)
            await c.subscribe(f"{tag}/results/#", qos=1)
            await c.publish(f"{prefix}/dev1", b'{"temperature": 12}', qos=1)
            [(_, result, _)] = await collect(c, f"{tag}/results/temperature", 1, timeout=60)
        status = ok(tmp_path / "state" / "control.sock", "status")
        proc.signal(signal.SIGTERM)
        worker.signal(signal.SIGTERM)
        assert proc.wait(60) == 0 and worker.wait(60) == 0
        daemon_log, worker_log = proc.log(), worker.log()
    assert result["status"] == "success"
    assert "daemon_ready" in daemon_log and "worker_ready" in worker_log
    assert password not in daemon_log
    assert password not in worker_log
    assert status["queue"]["broker"] == redact_url(redis.url)
    assert password not in str(status)
    assert ":***@" in daemon_log  # the broker URL is shown, redacted


def test_redact_url_forms() -> None:
    """Passwords go, everything else of the URL (and of a message around it) stays."""
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("mqtts://user:p@ss@broker:8883") == "mqtts://user:***@broker:8883"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("memory") == "memory"
    assert redact_url("redis://user@h/0") == "redis://user@h/0"
    assert (
        redact_url("Error connecting to rediss://:x@10.0.0.1:6380/1: refused")
        == "Error connecting to rediss://:***@10.0.0.1:6380/1: refused"
    )
    # Mistyped URLs are quoted by the errors that refuse them: their passwords go too.
    assert redact_url("mqtt:/u:pw@h:1883") == "mqtt:/u:***@h:1883"
    assert redact_url("redis//:pw@h:6379/0") == "redis//:***@h:6379/0"
    assert redact_url("rediss:/:pw@h") == "rediss:/:***@h"
    assert redact_url("mail me at a@b.com") == "mail me at a@b.com"


def test_a_refused_url_is_quoted_without_its_password(tmp_path: Path) -> None:
    """A bad queue.broker or mqtt.url is named in the error, its password is not."""
    password = unique("Pw9")
    s = base_settings(make_project(tmp_path), tmp_path, 1883)
    s["queue"] = {"broker": f"http://:{password}@127.0.0.1:6379/0"}
    s["mqtt"]["url"] = f"http://fp:{password}@127.0.0.1:1883"
    refused = _check(write_config(tmp_path, s))
    assert refused.returncode == 2
    assert "queue.broker" in refused.stderr and "http://:***@127.0.0.1:6379/0" in refused.stderr
    assert password not in refused.stderr + refused.stdout
    s["queue"] = {"broker": f"redis//:{password}@127.0.0.1:6379/0"}
    s["mqtt"]["url"] = f"mqtt:/fp:{password}@127.0.0.1:1883"
    mistyped = _check(write_config(tmp_path, s))
    assert mistyped.returncode == 2 and "mqtt.url" in mistyped.stderr, mistyped.stderr
    assert password not in mistyped.stderr + mistyped.stdout


def _relative_config(tmp_path: Path, port: int) -> Path:
    """A config in its own directory whose project, state_dir and socket are relative."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    make_project(conf_dir)  # conf/project
    s: dict[str, Any] = base_settings(Path("project"), tmp_path, port)
    s["project"] = "project"
    s["state_dir"] = "state"
    s["control"] = {"socket": "run/ctl.sock"}
    s["triggers"] = [{"name": "tick", "type": "interval", "every": "1h", "pipeline": "stats"}]
    config = conf_dir / "daemon.yml"
    config.write_text(yaml.safe_dump(s))
    return config


def test_state_dir_and_socket_are_relative_to_the_config_file(
    tmp_path: Path, mosquitto_session: MosquittoService
) -> None:
    """`check` and `run` started from another directory find the project, state dir and
    socket next to the config file, not in the working directory."""
    config = _relative_config(tmp_path, mosquitto_session.port)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, **NO_SYSTEMD, "HAMILTON_TELEMETRY_ENABLED": "false"}
    checked = subprocess.run(
        [str(BIN / "flowerpower-daemon"), "check", "-c", str(config)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    old = Path.cwd()
    os.chdir(elsewhere)  # the daemon inherits this working directory
    try:
        with daemon(config, env=NO_SYSTEMD) as proc:
            sock = config.parent / "run" / "ctl.sock"
            status = wait_ready(sock, proc)
            assert status["state_dir"] == str(config.parent / "state")
            assert status["socket"] == str(sock)
            proc.signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    finally:
        os.chdir(old)
    assert (config.parent / "state" / "history.sqlite3").exists()
    assert not (elsewhere / "state").exists() and not (elsewhere / "run").exists()


def test_problems_of_untriggered_pipelines_are_warnings() -> None:
    """Only problems in a pipeline's own files, for a pipeline no trigger uses, are warnings."""
    problems = [
        ConfigProblem("/p/conf/project.yml", "adapter", "bad"),
        ConfigProblem("/p/conf/pipelines/used.yml", "run.executor", "bad"),
        ConfigProblem("/p/conf/pipelines/other.yml", "run.executor", "bad"),
        ConfigProblem("/p/pipelines/other2.py", "", "cannot import"),
        ConfigProblem("config", "triggers[0].pipeline", "unknown pipeline"),
    ]
    errors, warnings = split_problems(problems, {"used"})
    assert [p.file for p in warnings] == ["/p/conf/pipelines/other.yml", "/p/pipelines/other2.py"]
    assert [p.file for p in errors] == [
        "/p/conf/project.yml",
        "/p/conf/pipelines/used.yml",
        "config",
    ]


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"}
    return subprocess.run(
        [str(BIN / "flowerpower-daemon"), "check", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_warns_about_untriggered_pipelines_and_names_triggered_ones(
    tmp_path: Path,
) -> None:
    """`check`: a bad YAML of a pipeline no trigger runs is a warning line; the same file
    of a triggered pipeline is a problem of its own."""
    project = make_project(tmp_path)
    s = base_settings(project, tmp_path, 1883)
    s["triggers"] = [{"name": "tick", "type": "interval", "every": "1h", "pipeline": "stats"}]
    config = write_config(tmp_path, s)
    assert _check(config).returncode == 0
    (project / "conf" / "pipelines" / "slow.yml").write_text("run:\n  finl_vars: [x]\n")
    untriggered = _check(config)
    assert untriggered.returncode == 0, untriggered.stderr  # nothing the daemon runs is broken
    warnings = [line for line in untriggered.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "slow.yml" in warnings[0], untriggered.stderr
    assert "finl_vars" in warnings[0] and "error:" not in untriggered.stderr
    (project / "conf" / "pipelines" / "slow.yml").unlink()
    (project / "conf" / "pipelines" / "stats.yml").write_text("run:\n  finl_vars: [x]\n")
    triggered = _check(config)
    assert triggered.returncode == 2
    assert "warning:" not in triggered.stderr and "stats.yml" in triggered.stderr
