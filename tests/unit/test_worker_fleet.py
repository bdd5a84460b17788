"""Issue 13 (fleet workers), the parts without servers: result identity, key naming, the
``--processes`` command line. Real daemons and workers: tests/integration/test_worker_*.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import orjson
import pytest
import yaml

from flowerpower_daemon.cli import main
from flowerpower_daemon.project.encoding import encode_result
from flowerpower_daemon.project.models import ErrorInfo, RunRequest, RunResult
from flowerpower_daemon.queue.broker import RunExecutor, worker_name
from flowerpower_daemon.queue.streams import hash_tagged


def test_worker_name_is_host_and_pid() -> None:
    assert worker_name() == f"{socket.gethostname()}:{os.getpid()}"


def test_result_message_has_worker_only_when_known() -> None:
    result = RunResult.not_run(RunRequest("p"), "failed", ErrorInfo("E", "m"))
    assert "worker" not in result.to_dict()
    result.worker = "h:1"
    assert orjson.loads(encode_result(result))["worker"] == "h:1"


class _Runner:
    async def run(self, request: RunRequest) -> RunResult:
        return RunResult.not_run(request, "failed", ErrorInfo("E", "m"))


class _Sink:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        self.got.append(encode_result(result))


async def test_executor_names_this_process_and_counts_runs() -> None:
    sink = _Sink()
    executor = RunExecutor(_Runner(), sink)  # type: ignore[arg-type]
    await executor(RunRequest("p").to_dict())
    await executor(RunRequest("p").to_dict())
    assert [orjson.loads(m)["worker"] for m in sink.got] == [worker_name()] * 2
    assert executor.done == 2
    named = RunExecutor(_Runner(), sink, who="elsewhere:7")  # type: ignore[arg-type]
    await named(RunRequest("p").to_dict())
    assert orjson.loads(sink.got[-1])["worker"] == "elsewhere:7"


@pytest.mark.parametrize(
    ("queue", "tagged"),
    [("flowerpower", "{flowerpower}"), ("{fp}", "{fp}"), ("a{b}c", "a{b}c"), ("a{}", "{a{}}")],
)
def test_queue_name_becomes_a_cluster_hash_tag(queue: str, tagged: str) -> None:
    assert hash_tagged(queue) == tagged


def test_processes_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--processes", "0"]) == 2
    assert "--processes" in capsys.readouterr().err


def test_processes_need_a_redis_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The parent checks the config before it starts children: memory queue, exit 2."""
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"project": str(tmp_path), "state_dir": str(tmp_path / "s")}))
    assert main(["worker", "-c", str(config), "--processes", "2"]) == 2
    assert "redis" in capsys.readouterr().err
