"""The status page ``/`` as a real browser (headless Chromium) sees it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from tests.daemon_harness import configure, mqtt_trigger, online_daemon, unique
from tests.services import free_port, require_binary

pytestmark = pytest.mark.timeout(180)

#: Headless, and quiet: no network of its own, no first-run, no updates.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(url: str, tmp: Path, *extra: str) -> str:
    """Run headless Chromium on ``url`` with ``extra`` flags; its stdout."""
    binary = require_binary("chromium")
    proc = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium'}", *extra, url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


async def test_status_page_in_chromium_shows_pipelines_triggers_and_a_finished_run(
    tmp_path: Path, mosquitto: Any
) -> None:
    """Chromium renders ``/``: the project's pipelines, the triggers (a name with markup
    shown as text, not as markup), and the run that just finished with its status."""
    prefix = unique("page")
    http = free_port()
    odd = "temp<b>bold</b>"
    config = configure(
        tmp_path,
        mosquitto.port,
        [mqtt_trigger(odd, "temperature", f"{prefix}/{{device}}")],
        http={"listen": f"127.0.0.1:{http}"},
    )
    async with online_daemon(config, subscribe=[config.results]) as d:
        await d.client.publish(f"{prefix}/dev1", b'{"temperature": 25}', qos=1)
        _, result, _ = await d.next_message(config.results, timeout=20)
        assert result["status"] == "success"
        dom = await anyio.to_thread.run_sync(
            chromium, f"http://127.0.0.1:{http}/", tmp_path, "--dump-dom"
        )
    assert "<h2>Pipelines</h2>" in dom
    for pipeline in ("temperature", "stats", "broken", "slow"):
        assert f"<td>{pipeline}</td>" in dom, dom
    assert "temp&lt;b&gt;bold&lt;/b&gt;" in dom and "<b>bold</b>" not in dom, dom
    row = dom[dom.index(f"<td>{result['run_id']}</td>") :].split("</tr>")[0]
    assert '<td class="success">success</td>' in row, row
    assert " ms</td>" in row, row
