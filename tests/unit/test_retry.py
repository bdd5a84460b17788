"""Retries: attempt counts, backoff and jitter, which errors are retried, per-attempt timeouts."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from flowerpower_daemon.errors import InputError, RunTimeoutError
from flowerpower_daemon.project import FlowerPowerProject, RunRequest, RunResult
from flowerpower_daemon.retry import Backoff, exception_matches

if TYPE_CHECKING:
    from conftest import CallLog, ProjectFactory

Execute = Callable[[FlowerPowerProject, RunRequest], RunResult]

FLAKY = """
import asyncio
import json
import time

LOG = {log!r}


class TransientError(ConnectionError):
    '''A project-specific error whose base class is a builtin.'''


ERRORS = {{
    "ValueError": ValueError,
    "KeyError": KeyError,
    "TransientError": TransientError,
    "JSONDecodeError": lambda msg: json.JSONDecodeError(msg, "{{}}", 0),
}}


def flaky(error: str, fail_times: int) -> int:
    '''Fails with ``error`` on its first ``fail_times`` calls.'''
    with open(LOG, "a") as fh:
        fh.write("flaky\\n")
    with open(LOG) as fh:
        calls = len(fh.read().split())
    if calls <= fail_times:
        raise ERRORS[error](f"call {{calls}} failed")
    return calls


def sleepy(seconds: float) -> float:
    '''Blocks its thread for ``seconds``.'''
    time.sleep(seconds)
    return seconds


def typed(count: int) -> int:
    return count * 2
"""

ASYNC_SLEEPY = """
import asyncio


async def sleepy(seconds: float) -> float:
    '''Sleeps on the event loop for ``seconds``.'''
    await asyncio.sleep(seconds)
    return seconds
"""

BROKEN_GRAPH = """
def number(x: int) -> int:
    return x


def text(number: str) -> str:
    return number
"""


@pytest.fixture(params=["run_sync", "run"])
def execute(request: pytest.FixtureRequest) -> Execute:
    """Runs a request through the blocking path or the async path of the runner."""
    if request.param == "run_sync":
        return lambda project, req: project.execute(req)
    return lambda project, req: anyio.run(project.aexecute, req)


@pytest.fixture
def flaky(projects: ProjectFactory, call_log: Callable[[str], CallLog]) -> tuple[Any, CallLog]:
    """A project whose ``flaky`` node fails a chosen number of times, and its call log."""
    log = call_log("flaky")
    project = projects.load({"flaky": FLAKY.format(log=str(log.path))})
    return project, log


def request(project: FlowerPowerProject, error: str, fail_times: int, **run: Any) -> RunRequest:
    """A request for the ``flaky`` node with a fast default retry delay."""
    run.setdefault("retry_delay", 0.01)
    return project.request(
        "flaky", {"error": error, "fail_times": fail_times}, final_vars=["flaky"], **run
    )


# ------------------------------------------------------------------ the policy itself


def test_backoff_sequence() -> None:
    """Delays grow by the multiplier per retry and stop at the cap."""
    backoff = Backoff(base=0.5, multiplier=2.0, cap=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_without_multiplier_is_constant() -> None:
    """With the default multiplier every retry waits the base delay."""
    assert {Backoff(base=0.2).delay(n) for n in range(1, 10)} == {0.2}


@settings(deadline=None)  # pure math; a loaded machine must not fail it
@given(
    base=st.floats(min_value=0.0, max_value=60.0),
    multiplier=st.floats(min_value=1.0, max_value=4.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    retry=st.integers(min_value=1, max_value=8),
    seed=st.integers(),
)
def test_jitter_stays_within_bounds(
    base: float, multiplier: float, jitter: float, retry: int, seed: int
) -> None:
    """``delay * (1 + U(-j, j))`` stays within ``[delay * (1 - j), delay * (1 + j)]``."""
    raw = base * multiplier ** (retry - 1)
    delay = Backoff(base, multiplier, jitter).delay(retry, random.Random(seed))
    assert raw * (1 - jitter) - 1e-9 <= delay <= raw * (1 + jitter) + 1e-9
    assert delay >= 0.0


class _Transient(ConnectionError):
    """An error class defined here, matched by its base class's name."""


@pytest.mark.parametrize(
    ("exc", "names", "matches"),
    [
        (ValueError("x"), [], True),
        (ValueError("x"), ["ValueError"], True),
        (ValueError("x"), ["builtins.ValueError"], True),
        (ValueError("x"), ["KeyError", "TypeError"], False),
        (_Transient("x"), ["ConnectionError"], True),
        (_Transient("x"), ["OSError"], True),
        (_Transient("x"), ["_Transient"], True),
        (_Transient("x"), [f"{__name__}._Transient"], True),
        (_Transient("x"), ["TimeoutError"], False),
        (json.JSONDecodeError("x", "", 0), ["json.decoder.JSONDecodeError"], True),
        (json.JSONDecodeError("x", "", 0), ["json.JSONDecodeError"], True),
        (json.JSONDecodeError("x", "", 0), ["ValueError"], True),
        (KeyError("x"), ["json.JSONDecodeError"], False),
        (KeyError("x"), ["not_imported_anywhere.KeyErrorish"], False),
    ],
)
def test_exception_matches(exc: BaseException, names: list[str], matches: bool) -> None:
    """Names match by class name, dotted path or public alias, along the exception's MRO."""
    assert exception_matches(exc, names) is matches


def test_exception_matches_never_takes_base_exceptions_by_default() -> None:
    """An empty list retries every Exception but never KeyboardInterrupt or cancellation."""
    assert exception_matches(KeyboardInterrupt(), []) is False


# ------------------------------------------------------------------ the runner's retries


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_attempts_are_max_retries_plus_one(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute, max_retries: int
) -> None:
    """A node that always fails runs exactly max_retries + 1 times, each attempt recorded."""
    project, log = flaky
    result = execute(project, request(project, "ValueError", 99, max_retries=max_retries))
    assert result.status == "failed"
    assert log.count("flaky") == max_retries + 1
    assert [a.number for a in result.attempts] == list(range(1, max_retries + 2))
    assert {a.status for a in result.attempts} == {"failed"}
    assert result.to_dict()["attempts"] == max_retries + 1
    assert result.error is not None
    assert (result.error.type, result.error.node) == ("ValueError", "flaky")
    assert result.error.message == f"call {max_retries + 1} failed"


def test_success_after_retries(flaky: tuple[FlowerPowerProject, CallLog], execute: Execute) -> None:
    """A node that fails twice then succeeds gives success, with the two failures recorded."""
    project, log = flaky
    result = execute(project, request(project, "ValueError", 2, max_retries=5))
    assert result.status == "success"
    assert result.outputs == {"flaky": 3}
    assert [a.status for a in result.attempts] == ["failed", "failed", "success"]
    assert result.attempts[0].error is not None
    assert result.attempts[0].error.message == "call 1 failed"
    assert result.error is None
    assert log.count("flaky") == 3


def test_delay_sequence_with_backoff(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """Retry n waits retry_delay * retry_backoff**(n-1), and really waits at least that."""
    project, _ = flaky
    req = request(project, "ValueError", 99, max_retries=3, retry_delay=0.02, retry_backoff=2)
    with capture_logs() as logs:
        result = execute(project, req)
    delays = [e["retry_in_s"] for e in logs if e["event"] == "attempt_failed"]
    assert delays == [0.02, 0.04, 0.08]
    attempts = result.attempts
    gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in pairwise(attempts)]
    assert all(gap >= delay * 0.99 for gap, delay in zip(gaps, delays, strict=True)), gaps


def test_jittered_delays_stay_within_bounds(flaky: tuple[FlowerPowerProject, CallLog]) -> None:
    """With jitter_factor j every retry waits within retry_delay * (1 +/- j)."""
    project, _ = flaky
    req = request(project, "ValueError", 99, max_retries=4, retry_delay=0.02, jitter_factor=0.5)
    with capture_logs() as logs:
        project.execute(req)
    delays = [e["retry_in_s"] for e in logs if e["event"] == "attempt_failed"]
    assert len(delays) == 4
    assert all(0.01 - 1e-3 <= d <= 0.03 + 1e-3 for d in delays), delays


@pytest.mark.parametrize(
    ("error", "names"),
    [
        ("ValueError", ["ValueError"]),
        ("ValueError", ["builtins.ValueError"]),
        ("TransientError", ["ConnectionError"]),
        ("TransientError", ["TransientError"]),
        ("JSONDecodeError", ["json.JSONDecodeError"]),
        ("JSONDecodeError", ["ValueError"]),
    ],
)
def test_matching_exceptions_are_retried(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute, error: str, names: list[str]
) -> None:
    """An error named in retry_exceptions (by name, dotted path or base class) is retried."""
    project, log = flaky
    result = execute(project, request(project, error, 1, max_retries=2, retry_exceptions=names))
    assert result.status == "success"
    assert log.count("flaky") == 2


def test_dotted_path_of_a_pipeline_error_is_retried(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """An error class defined in the pipeline module matches by its module's dotted path."""
    project, log = flaky
    module = project.runner.prepare("flaky").driver.graph_modules[0].__name__
    req = request(
        project, "TransientError", 1, max_retries=2, retry_exceptions=[f"{module}.TransientError"]
    )
    assert execute(project, req).status == "success"
    assert log.count("flaky") == 2


def test_non_matching_exception_is_not_retried(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """An error not named in retry_exceptions fails at once."""
    project, log = flaky
    req = request(project, "KeyError", 99, max_retries=3, retry_exceptions=["ValueError"])
    result = execute(project, req)
    assert result.status == "failed"
    assert len(result.attempts) == 1
    assert log.count("flaky") == 1
    assert result.error is not None
    assert result.error.type == "KeyError"


@pytest.mark.parametrize(
    ("inputs", "final_vars", "expected"),
    [
        ({}, ["typed"], "missing required input 'count' (needed by typed)"),
        ({"count": "three"}, ["typed"], "input 'count' has the wrong type: expected int, got str"),
        ({"count": None}, ["typed"], "input 'count' is null, expected int"),
        ({"count": 3}, ["typd"], "unknown final var(s) 'typd' (did you mean 'typed'?)"),
    ],
)
def test_errors_no_retry_can_fix_fail_at_once(
    flaky: tuple[FlowerPowerProject, CallLog],
    execute: Execute,
    inputs: dict[str, Any],
    final_vars: list[str],
    expected: str,
) -> None:
    """A missing, wrongly typed or null (JSON ``null``) input or an unknown final var is
    never retried."""
    project, _ = flaky
    req = project.request("flaky", inputs, final_vars=final_vars, max_retries=3, retry_delay=0.01)
    result = execute(project, req)
    assert result.status == "failed"
    assert len(result.attempts) == 1
    assert result.error is not None
    assert result.error.type == "InputError"
    assert result.error.retryable is False
    assert expected in result.error.message
    assert isinstance(result.exception, InputError)


def test_graph_that_does_not_build_fails_at_once(
    projects: ProjectFactory, execute: Execute
) -> None:
    """A DAG whose types do not line up fails with one attempt, naming the clash."""
    project = projects.load({"broken": BROKEN_GRAPH})
    req = project.request("broken", {"x": 1}, max_retries=3, retry_delay=0.01)
    result = execute(project, req)
    assert result.status == "failed"
    assert len(result.attempts) == 1
    assert result.error is not None
    assert result.error.type == "InputError"
    assert "the Hamilton graph does not build" in result.error.message
    assert "text" in result.error.message


def test_async_pipeline_missing_input_fails_at_once(
    projects: ProjectFactory, execute: Execute
) -> None:
    """On the async driver too, a missing or wrongly typed input fails with one attempt."""
    project = projects.load({"sleepy": ASYNC_SLEEPY})
    for inputs, expected in [
        ({}, "missing required input 'seconds' (needed by sleepy)"),
        ({"seconds": "slow"}, "input 'seconds' has the wrong type"),
    ]:
        result = execute(
            project, project.request("sleepy", inputs, max_retries=2, retry_delay=0.01)
        )
        assert result.status == "failed"
        assert len(result.attempts) == 1
        assert result.error is not None
        assert result.error.type == "InputError"
        assert expected in result.error.message


def test_timeout_gives_status_timeout(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """An attempt longer than ``timeout`` ends the run with status 'timeout', every try logged."""
    project, _ = flaky
    req = project.request(
        "flaky",
        {"seconds": 5.0},
        final_vars=["sleepy"],
        timeout=0.05,
        max_retries=1,
        retry_delay=0.01,
    )
    result = execute(project, req)
    assert result.status == "timeout"
    assert [a.status for a in result.attempts] == ["timeout", "timeout"]
    assert result.error is not None
    assert result.error.type == "RunTimeoutError"
    assert "exceeded its timeout of 0.05 s" in result.error.message
    assert isinstance(result.exception, RunTimeoutError)
    assert result.to_dict()["status"] == "timeout"


def test_async_timeout_cancels_the_attempt(projects: ProjectFactory, execute: Execute) -> None:
    """An async node past its timeout is cancelled: the run ends long before the node would."""
    project = projects.load({"sleepy": ASYNC_SLEEPY})
    project.runner.prepare("sleepy")
    result = execute(project, project.request("sleepy", {"seconds": 30.0}, timeout=0.05))
    assert result.status == "timeout"
    assert len(result.attempts) == 1
    assert result.duration_ms < 10_000


def test_timeout_then_success_is_success(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """A timed-out attempt is retried like any failure; a later success wins."""
    project, _ = flaky
    req = project.request(
        "flaky", {"seconds": 0.0}, final_vars=["sleepy"], timeout=5.0, max_retries=1
    )
    result = execute(project, req)
    assert result.status == "success"
    assert result.outputs == {"sleepy": 0.0}


def test_timeout_not_in_retry_exceptions_is_not_retried(
    flaky: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """retry_exceptions also governs timeouts: TimeoutError must be named to retry them."""
    project, _ = flaky
    base = {"final_vars": ["sleepy"], "timeout": 0.05, "max_retries": 1, "retry_delay": 0.01}
    only_value = execute(
        project,
        project.request("flaky", {"seconds": 5.0}, retry_exceptions=["ValueError"], **base),
    )
    with_timeout = execute(
        project,
        project.request("flaky", {"seconds": 5.0}, retry_exceptions=["TimeoutError"], **base),
    )
    assert len(only_value.attempts) == 1
    assert len(with_timeout.attempts) == 2
