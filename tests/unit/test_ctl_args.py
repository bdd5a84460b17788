"""flowerpowerctl's command line: options of the client and of the run stay apart."""

from __future__ import annotations

from flowerpower_daemon.control.client import _parser, _request


def test_run_timeout_is_the_attempts_not_the_clients() -> None:
    """`run --timeout` limits each attempt; the global `--timeout` is how long the client waits."""
    run = _parser().parse_args(["run", "slow", "--wait", "--timeout", "0.5"])
    assert run.answer_timeout is None
    assert _request(run)[1]["run"] == {"timeout": 0.5}
    client = _parser().parse_args(["--timeout", "7", "run", "slow", "--wait"])
    assert client.answer_timeout == 7.0
    assert "run" not in _request(client)[1]
