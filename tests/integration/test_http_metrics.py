"""``http.listen``: a real Prometheus scrapes the daemon; /readyz follows the broker.

The daemon runs real MQTT messages (good, failing, garbage) through a real
Mosquitto and an interval timer; Prometheus (the Debian package) scrapes
``/metrics`` every second and the test reads the counters back through
Prometheus's own query API. Then the broker stops: ``/readyz`` answers 503
with the reason, and 200 again once the broker is back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.daemon_harness import BIN, configure, mqtt_trigger, online_daemon, unique
from tests.http_harness import aget, metric_value, prometheus, raw, wait_metric, wait_status
from tests.services import free_port

pytestmark = pytest.mark.timeout(180)


async def test_prometheus_reads_the_daemons_counters_and_readyz_follows_the_broker(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Counters by pipeline, trigger and status, error reasons, histograms, timer fires:
    as Prometheus stores them; /readyz 503 while Mosquitto is down, 200 after."""
    prefix = unique("m")
    http = free_port()
    triggers = [
        mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}/temperature", payload="json"),
        mqtt_trigger("boom", "broken", f"{prefix}/boom"),
        {"name": "tick", "type": "interval", "pipeline": "stats", "every": "1s"},
    ]
    config = configure(tmp_path, mosquitto.port, triggers, http={"listen": f"127.0.0.1:{http}"})
    with prometheus(tmp_path / "prom", {"flowerpower": http}) as prom:
        async with online_daemon(config, subscribe=[config.results, config.errors]) as d:
            assert (await aget(http, "/readyz")) == (200, "ready\n")
            for i in range(5):
                await d.client.publish(
                    f"{prefix}/dev{i}/temperature", b'{"temperature": 21.5}', qos=1
                )
            for _ in range(2):
                await d.client.publish(f"{prefix}/boom", b'{"x": 3}', qos=1)
            await d.client.publish(f"{prefix}/dev9/temperature", b"{not json", qos=1)
            # 5 successes on the results topic; 2 failed runs + 1 bad payload on errors.
            errors = await d.collect(config.errors, 3, timeout=30)
            reasons = sorted(e.data["error"]["type"] for e in errors)
            assert reasons == ["PayloadError", "RuntimeError", "RuntimeError"], errors

            job = 'job="flowerpower"'
            await prom.wait_value(
                f'flowerpower_runs_total{{{job},pipeline="temperature",trigger="temp",'
                f'status="success"}}',
                5,
            )
            await prom.wait_value(
                f'flowerpower_runs_total{{{job},pipeline="broken",status="failed"}}', 2
            )
            await prom.wait_value(
                f'flowerpower_error_results_total{{{job},reason="RuntimeError"}}', 2
            )
            await prom.wait_value(
                f'flowerpower_error_results_total{{{job},reason="PayloadError"}}', 1
            )
            await prom.wait_value(f"flowerpower_messages_in_total{{{job}}}", 8)
            await prom.wait_value(f"flowerpower_bad_input_total{{{job}}}", 1)
            await prom.wait_value(f'flowerpower_trigger_fires_total{{{job},trigger="temp"}}', 6)
            await prom.wait_value(
                f'flowerpower_run_duration_seconds_count{{{job},pipeline="temperature"}}', 5
            )
            await prom.wait_value(
                f'flowerpower_run_latency_seconds_count{{{job},pipeline="temperature"}}', 5
            )
            await prom.wait_value(f"flowerpower_mqtt_connected{{{job}}}", 1)
            await prom.wait_value(f"flowerpower_acks_pending{{{job}}}", 0)
            await prom.wait_value(f"up{{{job}}}", 1)
            # The interval timer fired, on time within a second, and its runs are counted.
            fires = await prom.value(
                f'flowerpower_timer_lateness_seconds_count{{{job},trigger="tick"}}'
            )
            assert fires is not None and fires >= 1
            late = await prom.value(
                f'flowerpower_timer_lateness_seconds_bucket{{{job},trigger="tick",le="1.0"}}'
            )
            assert late == fires
            ticks = await prom.value(
                f'sum(flowerpower_runs_total{{{job},trigger="tick",status="success"}})'
            )
            assert ticks is not None and ticks >= 1

            # The broker goes away: not ready, with the reason; back: ready again.
            await mosquitto.astop()
            body = await wait_status(http, "/readyz", 503, timeout=30)
            assert "MQTT broker" in body and "not connected" in body, body
            assert (await aget(http, "/healthz")) == (200, "ok\n")
            await prom.wait_value(f"flowerpower_mqtt_connected{{{job}}}", 0)
            await mosquitto.astart()
            await wait_status(http, "/readyz", 200, timeout=60)
            status, text = await aget(http, "/metrics")
            assert status == 200
            reconnects = metric_value(text, "flowerpower_mqtt_reconnects_total")
            assert reconnects is not None and reconnects >= 1, text


async def test_bad_requests_get_an_answer_and_do_not_disturb_the_daemon(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Garbage, other methods, unknown paths, a head over 8 KiB: 400/405/404, and the
    daemon (and its listener) carry on."""
    http = free_port()
    prefix = unique("bad")
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger("temp", "temperature", f"{prefix}/{{device}}")],
        http={"listen": f"127.0.0.1:{http}"},
    )
    async with online_daemon(config, subscribe=[config.results]) as d:

        def status_of(answer: bytes) -> int:
            return int(answer.split(b" ", 2)[1])

        answers = {
            "garbage": await anyio.to_thread.run_sync(raw, http, b"\x00\x01hello\r\n\r\n"),
            "post": await anyio.to_thread.run_sync(
                raw, http, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            "unknown": await anyio.to_thread.run_sync(
                raw, http, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            "huge": await anyio.to_thread.run_sync(
                raw, http, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
            ),
            "head": await anyio.to_thread.run_sync(
                raw, http, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
        }
        assert {k: status_of(v) for k, v in answers.items()} == {
            "garbage": 400,
            "post": 405,
            "unknown": 404,
            "huge": 400,
            "head": 200,
        }
        assert answers["head"].endswith(b"\r\n\r\n")  # HEAD: no body
        # A client that connects and says nothing does not block the others.
        with socket.create_connection(("127.0.0.1", http)):
            assert (await aget(http, "/healthz"))[0] == 200
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 1}', qos=1)
        _, result, _ = await d.next_message(config.results, timeout=20)
        assert result["status"] == "success"
        status, text = await aget(http, "/metrics")
        assert status == 200 and metric_value(text, "flowerpower_ready") == 1.0


def test_check_names_the_extra_when_prometheus_client_is_missing(
    tmp_path: Path, mosquitto: Any
) -> None:
    """``http.listen`` without prometheus-client: ``check`` says which extra, in one line.

    prometheus-client is installed here (dev extra), so the child blocks its import
    (``sys.modules[name] = None``) before it runs the CLI's ``main``.
    """
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger("temp", "temperature", f"{unique('x')}/{{device}}")],
        http={"listen": "127.0.0.1:9464"},
    )
    hide = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "from flowerpower_daemon.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"}
    for command in ("check", "run"):
        proc = subprocess.run(
            [sys.executable, "-c", hide, command, "-c", str(config.path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "metrics" in line]
        assert lines, proc.stderr
        assert f"{config.path}: http.listen" in lines[0], lines  # run names the file too
        assert "pip install 'flowerpower-daemon[metrics]'" in lines[0]
        assert "Traceback" not in proc.stderr
    # A bad address is a configuration error naming the key, no traceback.
    bad = config.path.read_text().replace("127.0.0.1:9464", "127.0.0.1:http")
    config.path.write_text(bad)
    proc = subprocess.run(
        [str(BIN / "flowerpower-daemon"), "check", "-c", str(config.path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2 and "http.listen" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path: Path, mosquitto: Any) -> None:
    """``http.listen`` on a taken port: exit 2, one ``error:`` line naming the key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = configure(
            tmp_path,
            mosquitto.port,
            [mqtt_trigger("temp", "temperature", f"{unique('p')}/{{device}}")],
            http={"listen": f"127.0.0.1:{port}"},
        )
        proc = subprocess.run(
            [str(BIN / "flowerpower-daemon"), "run", "-c", str(config.path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"},
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: http.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], proc.stderr[-2000:]


async def test_error_results_count_the_reasons_the_readme_names(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A run over its ``timeout`` and a garbage payload: error results by the reasons
    the README's metric table names (a timeout is ``RunTimeoutError``)."""
    http = free_port()
    prefix = unique("reason")
    triggers = [
        mqtt_trigger(
            "late",
            "slow",
            f"{prefix}/late",
            inputs={"seconds": 3.0},
            run={"final_vars": ["waited"], "timeout": 0.5, "max_retries": 0},
        ),
        mqtt_trigger("temp", "temperature", f"{prefix}/t", payload="json"),
    ]
    config = configure(tmp_path, mosquitto.port, triggers, http={"listen": f"127.0.0.1:{http}"})
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(f"{prefix}/late", b"{}", qos=1)
        await d.client.publish(f"{prefix}/t", b"{not json", qos=1)
        await d.collect(config.results, 2, timeout=30)
        text = await wait_metric(
            http, 'flowerpower_error_results_total{reason="RunTimeoutError"}', 1.0
        )
        assert metric_value(text, 'flowerpower_error_results_total{reason="PayloadError"}') == 1
        runs = 'flowerpower_runs_total{pipeline="slow",status="timeout",trigger="late"}'
        assert metric_value(text, runs) == 1.0, text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if "`flowerpower_error_results_total`" in line)
    assert "`RunTimeoutError`" in row and "`PayloadError`" in row and "`Cancelled`" in row, row


async def test_a_catch_up_fire_counts_as_a_fire_not_as_lateness(
    tmp_path: Path, mosquitto: Any
) -> None:
    """A ``date`` trigger already past at start fires once (a catch-up): counted in
    ``flowerpower_trigger_fires_total``, left out of the lateness histogram (README)."""
    http = free_port()
    at = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
    trigger = {"name": "past", "type": "date", "at": at, "pipeline": "stats"}
    config = configure(tmp_path, mosquitto.port, [trigger], http={"listen": f"127.0.0.1:{http}"})
    async with online_daemon(config):
        # The fire happens as the trigger is armed, before `online`: its result may come
        # before the harness listens. The fire counter is the sign it happened (the lateness
        # of a fire is observed with its count, in the same step).
        text = await wait_metric(http, 'flowerpower_trigger_fires_total{trigger="past"}', 1.0)
        assert 'flowerpower_timer_lateness_seconds_count{trigger="past"}' not in text, text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(
        line for line in readme.splitlines() if "`flowerpower_timer_lateness_seconds`" in line
    )
    assert "on-time timer fires" in row and "already past at start" in row, row
