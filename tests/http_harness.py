"""Talk HTTP to the daemon's listener and run a real Prometheus that scrapes it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from tests.services import free_port, require_binary, stop_process


def get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of ``GET http://127.0.0.1:port/path`` (blocking)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(port: int, path: str) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(get, port, path)


def raw(port: int, data: bytes, timeout: float = 15) -> bytes:
    """Send ``data`` as is and read the whole answer (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


async def wait_status(port: int, path: str, status: int, timeout: float) -> str:
    """Poll ``path`` until it answers ``status``; its body."""
    last: tuple[int, str] | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                try:
                    last = await aget(port, path)
                except OSError as exc:
                    last = (0, str(exc))
                if last[0] == status:
                    return last[1]
                await anyio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{path} not {status} in {timeout} s; last: {last}") from None


def metric_value(text: str, sample: str) -> float | None:
    """The value of the exposition line that starts with ``sample`` (name plus labels)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Prometheus:
    """A prometheus server on loopback with its own storage; ``query`` asks its HTTP API."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query_sync(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.loads(r.read())
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self.query_sync, promql)

    async def value(self, promql: str) -> float | None:
        """The single value of an instant query (None: no series)."""
        result = await self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    async def wait_value(self, promql: str, wanted: float, timeout: float = 30) -> None:
        """Until ``promql`` gives ``wanted`` (scrapes are every second)."""
        last = None
        try:
            with anyio.fail_after(timeout):
                while (last := await self.value(promql)) != wanted:  # noqa: ASYNC110
                    await anyio.sleep(0.5)  # Prometheus has no push: poll its API
        except TimeoutError:
            raise AssertionError(
                f"{promql} = {last}, not {wanted} in {timeout} s; log:\n{self.log()[-2000:]}"
            ) from None


@contextmanager
def prometheus(tmp: Path, targets: dict[str, int]) -> Iterator[Prometheus]:
    """A real ``prometheus`` scraping ``job -> port`` (``/metrics`` on 127.0.0.1) every 1 s."""
    binary = require_binary("prometheus")
    tmp.mkdir(parents=True, exist_ok=True)
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for job, port in targets.items()
    )
    config = tmp / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}"
    )
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port, proc, log_path)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {server.log()[-2000:]}")
            try:
                if get(port, "/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"prometheus not ready in 30 s: {server.log()[-2000:]}")
        yield server
    finally:
        stop_process(proc)


async def wait_metric(port: int, sample: str, wanted: float, timeout: float = 30) -> str:
    """Scrape ``/metrics`` until ``sample`` has ``wanted`` (a run's metrics are counted just
    after its result is published); the last scrape's text."""
    text = ""
    try:
        with anyio.fail_after(timeout):
            while True:
                _, text = await aget(port, "/metrics")
                if metric_value(text, sample) == wanted:
                    return text
                await anyio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{sample} not {wanted} in {timeout} s:\n{text}") from None
