"""One policy for inputs: names no node takes, deep type checks, and node tracebacks."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import anyio
import pandas as pd
import pytest

from flowerpower_daemon.project import FlowerPowerProject, RunResult
from flowerpower_daemon.project.inputtypes import compile_check, type_label
from flowerpower_daemon.project.models import RunRequest, TriggerInfo

if TYPE_CHECKING:
    from conftest import CallLog, ProjectFactory

STATS = """
from hamilton.function_modifiers import config


def mean(samples: list[float], scale: float = 1.0) -> float:
    with open({log!r}, "a") as fh:
        fh.write("mean\\n")
    return sum(samples) / len(samples) * scale


@config.when(mode="fast")
def label__fast(mode: str) -> str:
    return "fast:" + mode


@config.when(mode="slow")
def label__slow() -> str:
    return "slow"
"""

ASYNC_STATS = """
async def mean(samples: list[float]) -> float:
    with open({log!r}, "a") as fh:
        fh.write("mean\\n")
    return sum(samples) / len(samples)
"""

FAILING = """
def first(x: int) -> int:
    return x + 1


def second(first: int) -> int:
    if first > 10:
        raise ZeroDivisionError(f"first was {first}")
    return first
"""

Execute = Callable[[FlowerPowerProject, RunRequest], RunResult]


def _sync(project: FlowerPowerProject, request: RunRequest) -> RunResult:
    return project.execute(request)


def _async(project: FlowerPowerProject, request: RunRequest) -> RunResult:
    async def go() -> RunResult:
        with anyio.fail_after(60):
            return await project.aexecute(request)

    return anyio.run(go)


@pytest.fixture(params=[_sync, _async], ids=["run_sync", "run"])
def execute(request: pytest.FixtureRequest) -> Execute:
    """Both run paths: the CLI's (in the calling thread) and the daemon's (async)."""
    fn: Execute = request.param
    return fn


@pytest.fixture
def stats(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> tuple[FlowerPowerProject, CallLog]:
    log = call_log("stats")
    project = projects.load(
        {"stats": STATS.format(log=str(log.path))},
        {"stats": {"run": {"config": {"mode": "fast"}, "max_retries": 3, "retry_delay": 0.01}}},
    )
    return project, log


def _input_error(result: RunResult) -> str:
    """The message of a run that failed at once with an InputError."""
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "InputError", result.error
    assert len(result.attempts) == 1 and result.error.retryable is False
    return result.error.message


# ------------------------------------------------------------------ names no node takes


def test_unknown_input_is_an_error_listing_the_inputs(
    stats: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """A CLI/API request naming an input no node takes fails at once, with 'did you mean'."""
    project, log = stats
    message = _input_error(execute(project, project.request("stats", {"smples": [1.0]})))
    assert message == (
        "pipeline 'stats': no node takes input 'smples' (did you mean 'samples'?); "
        "the pipeline's inputs: samples, scale"
    )
    assert log.lines() == []


def test_config_keys_are_not_inputs(stats: tuple[FlowerPowerProject, CallLog]) -> None:
    """A ``@config.when`` key is not listed as an input, and giving it as one says why."""
    project, _ = stats
    prepared = project.runner.prepare("stats")
    assert "mode" in prepared.dag.inputs  # Hamilton makes it a user node: label__fast takes it
    assert prepared.input_names == {"samples", "scale"}
    message = _input_error(project.execute(project.request("stats", {"mode": "slow"})))
    assert "no node takes input 'mode' (a Hamilton config key: set it in config)" in message
    assert message.endswith("the pipeline's inputs: samples, scale")


@pytest.mark.parametrize("kind", ["mqtt", "file"])
def test_trigger_payload_fields_no_node_takes_are_ignored(
    stats: tuple[FlowerPowerProject, CallLog], execute: Execute, kind: Any
) -> None:
    """MQTT payloads and file events carry more than a pipeline needs: the rest is dropped."""
    project, _ = stats
    inputs = {"samples": [2.0, 4.0], "device": "d1", "mode": "slow"}
    request = project.request("stats", inputs, trigger=TriggerInfo("t", kind), final_vars=["mean"])
    result = execute(project, request)
    assert result.status == "success", result.error
    assert result.outputs == {"mean": 3.0}


def test_the_request_can_set_the_policy(stats: tuple[FlowerPowerProject, CallLog]) -> None:
    """``unknown_inputs`` on the request wins over its origin, and travels with it."""
    project, _ = stats
    lenient = project.request("stats", {"samples": [1.0], "extra": 1}, unknown_inputs="ignore")
    assert project.execute(lenient).status == "success"
    strict = RunRequest("stats", {"samples": [1.0], "extra": 1}, trigger=TriggerInfo("t", "mqtt"))
    strict.unknown_inputs = "error"
    assert "no node takes input 'extra'" in _input_error(project.execute(strict))
    again = RunRequest.from_dict(strict.to_dict())
    assert again.unknown_inputs == "error" and not again.ignores_unknown_inputs
    assert "unknown_inputs" not in RunRequest("stats").to_dict()


def test_unknown_inputs_error_serves_other_callers(
    stats: tuple[FlowerPowerProject, CallLog],
) -> None:
    """``Prepared.unknown_inputs_error`` gives the same message to schedule/trigger checks."""
    project, _ = stats
    prepared = project.runner.prepare("stats")
    assert prepared.unknown_inputs_error(["samples", "scale"]) is None
    error = prepared.unknown_inputs_error(["samples", "scael", "zzz"])
    assert error is not None
    assert str(error) == (
        "pipeline 'stats': no node takes inputs 'scael' (did you mean 'scale'?), 'zzz'; "
        "the pipeline's inputs: samples, scale"
    )


# ------------------------------------------------------------------ deep type checks


@pytest.mark.parametrize(
    ("samples", "why"),
    [
        ("", "expected list[float], got str"),
        (["x", 1], "expected list[float], item 0 is str"),
        ([1.0, None], "expected list[float], item 1 is None"),
        ([1.0, True], "expected list[float], item 1 is bool"),
        ({"a": 1.0}, "expected list[float], got dict"),
    ],
)
def test_inputs_are_checked_all_the_way_down_before_any_node(
    stats: tuple[FlowerPowerProject, CallLog], execute: Execute, samples: Any, why: str
) -> None:
    """``""`` or ``["x", 1]`` for ``list[float]`` never reach the node: one InputError."""
    project, log = stats
    result = execute(project, project.request("stats", {"samples": samples}))
    assert _input_error(result) == f"pipeline 'stats': input 'samples' has the wrong type: {why}"
    assert log.lines() == []


def test_async_pipeline_inputs_are_checked_too(
    projects: ProjectFactory, call_log: Callable[[str], CallLog], execute: Execute
) -> None:
    """The async driver gets the same check."""
    log = call_log("async")
    project = projects.load({"stats": ASYNC_STATS.format(log=str(log.path))})
    message = _input_error(execute(project, project.request("stats", {"samples": ["x", 1]})))
    assert "input 'samples' has the wrong type: expected list[float], item 0 is str" in message
    assert log.lines() == []


def test_json_ints_are_accepted_down_the_tree(
    stats: tuple[FlowerPowerProject, CallLog], execute: Execute
) -> None:
    """JSON integers count as floats inside lists too; every problem is reported at once."""
    project, _ = stats
    ok = execute(project, project.request("stats", {"samples": [1, 2.5], "scale": 2}))
    assert ok.status == "success", ok.error
    assert ok.outputs["mean"] == 3.5
    both = execute(project, project.request("stats", {"samples": "1", "scale": None}))
    assert _input_error(both) == (
        "pipeline 'stats': input 'samples' has the wrong type: expected list[float], got str; "
        "input 'scale' is null, expected float"
    )


def test_a_wrongly_typed_param_is_an_input_error(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """A value from params / run.inputs is checked like a request's."""
    log = call_log("params")
    project = projects.load(
        {"stats": STATS.format(log=str(log.path))},
        {"stats": {"params": {"scale": "big"}, "run": {"config": {"mode": "fast"}}}},
    )
    message = _input_error(project.execute(project.request("stats", {"samples": [1.0]})))
    assert message == "pipeline 'stats': input 'scale' has the wrong type: expected float, got str"


class _Point(typing.NamedTuple):
    x: float


@pytest.mark.parametrize(
    ("tp", "value", "why"),
    [
        (float, 3, None),
        (float, True, "has the wrong type: expected float, got bool"),
        (float, None, "is null, expected float"),
        (int, True, None),
        (str, 1, "has the wrong type: expected str, got int"),
        (Optional[list[float]], None, None),  # noqa: UP045
        (Optional[list[float]], ["x"], "has the wrong type: expected Optional[list[float]], item 0 is str"),  # noqa: UP045
        (list[Optional[float]], [None, 1], None),  # noqa: UP045
        (dict[str, list[int]], {"a": [1, "b"]}, "has the wrong type: expected dict[str, list[int]], value of 'a': item 1 is str"),
        (dict[str, int], {1: 1}, "has the wrong type: expected dict[str, int], key 1 is int"),
        (Mapping[str, Any], {"a": object()}, None),
        (Sequence[str], ("a", "b"), None),
        (Sequence[float], "", "has the wrong type: expected Sequence[float], got str"),
        (list[str], "ab", "has the wrong type: expected list[str], got str"),
        (list[list[float]], [[1.0], [2, "z"]], "has the wrong type: expected list[list[float]], item 1: item 1 is str"),
        (tuple[int, str], (1, 2), "has the wrong type: expected tuple[int, str], item 1 is int"),
        (tuple[int, ...], [1, 2], None),
        (Union[int, str], 1.5, "has the wrong type: expected Union[int, str], got float"),  # noqa: UP007
        (int | None, "1", "has the wrong type: expected int | None, got str"),
        (Literal["a", "b"], "c", "has the wrong type: expected Literal['a', 'b'], got 'c'"),
        (pd.DataFrame, {}, "has the wrong type: expected DataFrame, got dict"),
        (_Point, _Point(1.0), None),
        (Any, None, None),
        (object, "x", None),
        (bytes, b"x", None),
    ],
)
def test_compile_check(tp: Any, value: Any, why: str | None) -> None:
    """What the checker says for each kind of annotation (no check at all: every value fits)."""
    check = compile_check(tp)
    assert (check(value) if check is not None else None) == why


def test_iterators_are_not_consumed() -> None:
    """An ``Iterable[int]`` input given a generator is accepted without walking it."""
    check = compile_check(Iterable[int])
    assert check is not None
    items = (i for i in [1, 2])
    assert check(items) is None
    assert list(items) == [1, 2]


def test_every_value_fits_any() -> None:
    """``Any`` and ``object`` inputs get no check at all (nothing on the hot path)."""
    assert compile_check(Any) is None
    assert compile_check(object) is None
    assert compile_check(Optional[Any]) is None  # noqa: UP045
    assert type_label(list[float]) == "list[float]"
    assert type_label(typing.List[int]) == "List[int]"  # noqa: UP006


# ------------------------------------------------------------------ node tracebacks


def test_failing_node_traceback_on_request(projects: ProjectFactory, execute: Execute) -> None:
    """``traceback=True`` keeps the failing node's own traceback, from its frame down."""
    project = projects.load({"failing": FAILING})
    result = execute(project, project.request("failing", {"x": 50}, traceback=True))
    assert result.error is not None and result.error.node == "second"
    text = result.error.traceback
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "pipelines/failing.py" in lines[1] and lines[1].endswith("in second")
    assert lines[-1] == "ZeroDivisionError: first was 51"
    assert "hamilton" not in text
    assert result.error.to_dict()["traceback"] == text


def test_no_traceback_unless_asked(projects: ProjectFactory) -> None:
    """By default results carry no traceback (MQTT results and history stay small)."""
    project = projects.load({"failing": FAILING})
    result = project.execute(project.request("failing", {"x": 50}))
    assert result.error is not None
    assert result.error.traceback is None
    assert "traceback" not in result.error.to_dict()
    request = project.request("failing", {"x": 50}, traceback=True)
    assert RunRequest.from_dict(request.to_dict()).traceback is True
