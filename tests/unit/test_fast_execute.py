"""The fast executor gives what Hamilton's ``Driver.execute`` gives, or hands the run back.

Each case builds a real Hamilton driver and compares ``FastExecutor`` with
``Driver.execute`` on the same final vars and inputs: outputs, the exception
a node raises, and ``None`` (the runner then calls ``execute``, which raises
Hamilton's own error) where Hamilton refuses the inputs.
"""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import pytest

from flowerpower_daemon.project import _hamilton

hamilton_driver = pytest.importorskip("hamilton.driver")

SOURCE = """
from typing import Any


def base(x: float, scale: float = 2.0) -> float:
    return x * scale


def left(base: float) -> float:
    return base + 1


def right(base: float, offset: int = 10) -> float:
    return base + offset


def joined(left: float, right: float) -> float:
    return left + right


def label(name: str = "none") -> str:
    return f"label:{name}"


def tags(items: list[int]) -> int:
    return len(items)


def anything(blob: Any) -> str:
    return type(blob).__name__


def boom(x: float) -> float:
    if x < 0:
        raise ZeroDivisionError("negative x")
    return x
"""

CONFIG_SOURCE = """
def scaled(x: float, factor: float) -> float:
    return x * factor
"""


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(textwrap.dedent(source), f"<{name}>", "exec"), module.__dict__)
    sys.modules[name] = module
    return module


@pytest.fixture
def driver() -> Iterator[Any]:
    module = _module("fp_fast_exec_nodes", SOURCE)
    yield hamilton_driver.Builder().with_modules(module).build()
    sys.modules.pop(module.__name__, None)


def _same(dr: Any, final_vars: tuple[str, ...], inputs: dict[str, object]) -> dict[str, object]:
    fast = _hamilton.fast_executor(dr)
    assert fast is not None
    expected = dr.execute(list(final_vars), inputs=dict(inputs))
    for _ in range(2):  # compiled on the first call, replayed on the second
        assert fast(final_vars, dict(inputs)) == expected
    return dict(expected)


@pytest.mark.parametrize(
    ("final_vars", "inputs"),
    [
        (("joined",), {"x": 1.5}),
        (("joined", "base", "left"), {"x": 1.5, "scale": 3.0}),
        (("right", "left"), {"x": 2.0, "offset": 1}),
        (("label",), {}),
        (("label",), {"name": "n"}),
        (("label", "x"), {"name": "n", "x": 1.0}),  # an input asked for as an output
        (("tags",), {"items": [1, 2, 3]}),
        (("anything",), {"blob": object()}),
        (("base",), {"x": 1.0, "unused": "ignored"}),
        (("base",), {"x": None}),  # Hamilton lets None through
        (("right",), {"x": True}),  # bool is an int is a float's input? Hamilton decides
    ],
)
def test_outputs_match_hamilton(
    driver: Any, final_vars: tuple[str, ...], inputs: dict[str, object]
) -> None:
    try:
        driver.execute(list(final_vars), inputs=dict(inputs))
    except Exception as exc:
        fast = _hamilton.fast_executor(driver)
        assert fast is not None
        try:
            handed_back = fast(final_vars, dict(inputs)) is None
        except Exception as fast_exc:  # the node's own error: the same one
            assert type(fast_exc) is type(exc) and str(fast_exc) == str(exc)
        else:
            assert handed_back and isinstance(exc, ValueError)  # Hamilton's input error
        return
    _same(driver, final_vars, inputs)


def test_intermediate_values_are_not_outputs(driver: Any) -> None:
    out = _same(driver, ("joined",), {"x": 1.0})
    assert out == {"joined": 2.0 + 1 + 2.0 + 10}


@pytest.mark.parametrize(
    ("final_vars", "inputs"),
    [
        (("joined",), {}),  # a required input missing
        (("base",), {"x": "not a number"}),  # the wrong type
        (("tags",), {"items": "abc"}),
        (("nope",), {"x": 1.0}),  # an unknown final var
    ],
)
def test_runs_hamilton_refuses_are_handed_back(
    driver: Any, final_vars: tuple[str, ...], inputs: dict[str, object]
) -> None:
    fast = _hamilton.fast_executor(driver)
    assert fast is not None
    with pytest.raises(ValueError):
        driver.execute(list(final_vars), inputs=dict(inputs))
    assert fast(final_vars, dict(inputs)) is None


def test_a_type_refused_after_a_plan_exists_is_handed_back(driver: Any) -> None:
    fast = _hamilton.fast_executor(driver)
    assert fast is not None
    assert fast(("base",), {"x": 1.0}) == {"base": 2.0}
    assert fast(("base",), {"x": "1"}) is None


def test_a_failing_node_raises_its_own_exception(driver: Any) -> None:
    fast = _hamilton.fast_executor(driver)
    assert fast is not None
    with pytest.raises(ZeroDivisionError, match="negative x") as hamilton_error:
        driver.execute(["boom"], inputs={"x": -1.0})
    with pytest.raises(ZeroDivisionError, match="negative x") as fast_error:
        fast(("boom",), {"x": -1.0})
    # The node's own frame is in the traceback (the runner names the failing node by it).
    for info in (hamilton_error, fast_error):
        assert any(entry.name == "boom" for entry in info.traceback)


def test_config_values_are_inputs_and_clashes_are_handed_back() -> None:
    module = _module("fp_fast_exec_config", CONFIG_SOURCE)
    try:
        dr = hamilton_driver.Builder().with_modules(module).with_config({"factor": 3.0}).build()
        _same(dr, ("scaled",), {"x": 2.0})
        fast = _hamilton.fast_executor(dr)
        assert fast is not None
        assert fast(("scaled",), {"x": 2.0, "factor": 1.0}) is None
    finally:
        sys.modules.pop(module.__name__, None)


def test_drivers_with_adapters_are_not_fast() -> None:
    from hamilton import base

    module = _module("fp_fast_exec_adapted", CONFIG_SOURCE)
    try:
        dr = (
            hamilton_driver.Builder()
            .with_modules(module)
            .with_config({"factor": 1.0})
            .with_adapters(base.DictResult())
            .build()
        )
        assert _hamilton.fast_executor(dr) is None
    finally:
        sys.modules.pop(module.__name__, None)
