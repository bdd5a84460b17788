"""The pipeline runner: driver reuse, reloads, sync and async execution, callbacks, errors."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from flowerpower_daemon.errors import (
    FlowerPowerError,
    InputError,
    PipelineImportError,
    PipelineNotFoundError,
)
from flowerpower_daemon.project import FlowerPowerProject, RunResult

if TYPE_CHECKING:
    from conftest import CallLog, ProjectFactory

COUNTED = """
with open({log!r}, "a") as fh:
    fh.write("import\\n")


def doubled(x: int) -> int:
    with open({log!r}, "a") as fh:
        fh.write("doubled\\n")
    return x * {factor}
"""

LAYERED = """
def base(a: int, b: int, c: int) -> dict:
    '''Shows where each input came from.'''
    return {"a": a, "b": b, "c": c}


def unused_terminal(a: int) -> int:
    return a + 1
"""

THREADS = """
import asyncio
import threading


def sync_thread(x: int) -> str:
    return threading.current_thread().name


async def waited(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


def after_async(waited: int) -> int:
    return waited * 10
"""

SLOW = """
import time


def slept(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
"""

SYNC_THREAD = """
import threading


def thread_name(x: int) -> str:
    return threading.current_thread().name
"""

FAILING = """
def first(x: int) -> int:
    return x + 1


def second(first: int) -> int:
    if first > 10:
        raise ZeroDivisionError(f"first was {first}")
    return first


def third(second: int) -> int:
    return second
"""

HOOKS = """
RESULTS = []


def ok(result):
    RESULTS.append(("ok", result))


def failed(result):
    RESULTS.append(("failed", result))


async def async_ok(result):
    RESULTS.append(("async_ok", result))


def broken(result):
    raise RuntimeError("callback broke")
"""

CONFIGURED = """
from hamilton.function_modifiers import config


@config.when(mode="fast")
def speed__fast() -> str:
    return "fast"


@config.when(mode="slow")
def speed__slow() -> str:
    return "slow"


def ratio(scale: float) -> float:
    return scale / 2
"""


def load_counted(
    projects: ProjectFactory, call_log: Callable[[str], CallLog], **run: Any
) -> tuple[FlowerPowerProject, str, CallLog]:
    """A project whose ``doubled`` module logs each import and each node call."""
    log = call_log("counted")
    base = projects.make(
        {"counted": COUNTED.format(log=str(log.path), factor=2)},
        {"counted": {"run": run}} if run else None,
    )
    return projects.open(base), base, log


def hook_results() -> list[tuple[str, RunResult]]:
    """What the project's ``hooks.cb`` callbacks received."""
    results: list[tuple[str, RunResult]] = sys.modules["hooks.cb"].RESULTS
    return results


# ------------------------------------------------------------------ build once, reuse


def test_second_run_reuses_module_and_driver(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """A second run neither re-imports the module nor rebuilds the driver."""
    project, _, log = load_counted(projects, call_log)
    assert project.run("counted", {"x": 2}) == {"doubled": 4}
    first = project.runner.prepare("counted")
    assert project.run("counted", {"x": 3}) == {"doubled": 6}
    second = project.runner.prepare("counted")
    assert second is first
    assert second.driver is first.driver
    assert log.lines() == ["import", "doubled", "doubled"]


async def test_async_runs_reuse_the_driver(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """``arun`` also imports once and builds once."""
    project, _, log = load_counted(projects, call_log)
    with anyio.fail_after(60):
        for x in range(3):
            assert await project.arun("counted", {"x": x}) == {"doubled": 2 * x}
    assert log.count("import") == 1


def test_source_change_rebuilds(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """Editing the module makes the next run import it again and build a new driver."""
    project, base, log = load_counted(projects, call_log)
    assert project.run("counted", {"x": 2}) == {"doubled": 4}
    before = project.runner.prepare("counted")
    projects.write(base, "pipelines/counted.py", COUNTED.format(log=str(log.path), factor=10))
    assert project.run("counted", {"x": 2}) == {"doubled": 20}
    after = project.runner.prepare("counted")
    assert after.driver is not before.driver
    assert after.generation == before.generation + 1
    assert log.count("import") == 2


def test_source_change_is_noticed_only_after_check_interval(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """Within ``check_interval`` the runner does not look at the files again."""
    _, base, log = load_counted(projects, call_log)
    project = projects.open(base, check_interval=3600)
    assert project.run("counted", {"x": 2}) == {"doubled": 4}
    projects.write(base, "pipelines/counted.py", COUNTED.format(log=str(log.path), factor=10))
    assert project.run("counted", {"x": 2}) == {"doubled": 4}
    assert log.count("import") == 1


def test_reload_true_reimports_every_run(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """With ``reload: true`` every run imports the module afresh."""
    project, _, log = load_counted(projects, call_log, reload=True)
    for _ in range(3):
        assert project.run("counted", {"x": 1}) == {"doubled": 2}
    assert log.count("import") == 3


def test_reload_does_not_keep_old_drivers(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """Rebuilding for a new module generation drops the drivers of the old one."""
    project, _, _ = load_counted(projects, call_log, reload=True)
    for _ in range(5):
        project.run("counted", {"x": 1})
    assert len(project.runner._drivers) == 1


def test_overrides_get_their_own_prepared_run(
    projects: ProjectFactory, call_log: Callable[[str], CallLog]
) -> None:
    """A run with overrides does not disturb the YAML-configured one, and both are reused."""
    project, _, log = load_counted(projects, call_log)
    plain = project.runner.prepare("counted")
    tweaked = project.runner.prepare("counted", {"max_retries": 2})
    assert tweaked is not plain
    assert tweaked.run.max_retries == 2
    assert plain.run.max_retries == 0
    assert tweaked.driver is plain.driver
    assert project.runner.prepare("counted", {"max_retries": 2}) is tweaked
    assert log.count("import") == 1


def test_prepared_runs_and_drivers_are_bounded(projects: ProjectFactory) -> None:
    """A config per message (e.g. from a config hook) never keeps a driver per message."""
    from flowerpower_daemon.project.runner import PipelineRunner

    project = projects.load(
        {"configured": CONFIGURED}, {"configured": {"run": {"config": {"mode": "fast"}}}}
    )
    runner = PipelineRunner(project.runner.spec, max_prepared=3)
    for i in range(10):
        mode = "slow" if i % 2 else "fast"
        request = project.request(
            "configured", final_vars=["speed"], config={"mode": mode, "message": i}
        )
        assert runner.run_sync(request).outputs == {"speed": mode}
    # internal caches: what the bound is about
    assert len(runner._prepared) <= 3
    assert len(runner._drivers) <= 3


# ------------------------------------------------------------------ inputs and outputs


def test_inputs_precedence_key_by_key(projects: ProjectFactory) -> None:
    """params < run.inputs < request inputs, merged key by key."""
    project = projects.load(
        {"layered": LAYERED},
        {"layered": {"params": {"a": 1, "b": 1, "c": 1}, "run": {"inputs": {"b": 2, "c": 2}}}},
    )
    outputs = project.run("layered", {"c": 3}, final_vars=["base"])
    assert outputs == {"base": {"a": 1, "b": 2, "c": 3}}


def test_empty_final_vars_means_all_terminal_nodes(projects: ProjectFactory) -> None:
    """Without final_vars a run returns every node nothing else depends on."""
    project = projects.load({"layered": LAYERED}, {"layered": {"params": {"a": 1, "b": 2, "c": 3}}})
    assert set(project.run("layered")) == {"base", "unused_terminal"}
    assert project.runner.prepare("layered").final_vars == ("base", "unused_terminal")


def test_json_ints_are_accepted_for_float_inputs(projects: ProjectFactory) -> None:
    """An int given for a float input (as JSON payloads carry them) is accepted as a float."""
    project = projects.load(
        {"configured": CONFIGURED}, {"configured": {"run": {"config": {"mode": "fast"}}}}
    )
    outputs = project.run("configured", {"scale": 3}, final_vars=["ratio"])
    assert outputs == {"ratio": 1.5}


def test_run_config_selects_functions(projects: ProjectFactory) -> None:
    """``run.config`` picks ``@config.when`` variants; a per-run config override wins."""
    project = projects.load(
        {"configured": CONFIGURED}, {"configured": {"run": {"config": {"mode": "fast"}}}}
    )
    assert project.run("configured", final_vars=["speed"]) == {"speed": "fast"}
    slow = project.run("configured", final_vars=["speed"], config={"mode": "slow"})
    assert slow == {"speed": "slow"}


def test_additional_modules_add_nodes(projects: ProjectFactory) -> None:
    """Nodes from ``run.additional_modules`` (a sibling module in pipelines/) join the DAG."""
    project = projects.load(
        {"main": "def total(extra: int) -> int:\n    return extra + 1\n"},
        {"main": {"run": {"additional_modules": ["helpers"]}}},
        files={"pipelines/helpers.py": "def extra(x: int) -> int:\n    return x * 100\n"},
    )
    assert project.run("main", {"x": 2}, final_vars=["total"]) == {"total": 201}


def test_module_annotations_are_real_types(projects: ProjectFactory) -> None:
    """A pipeline module's annotations are evaluated as in a plain import (not strings)."""
    project = projects.load({"layered": LAYERED})
    module = project.runner.prepare("layered").driver.graph_modules[0]
    assert module.base.__annotations__["a"] is int


def test_result_message_shape(projects: ProjectFactory) -> None:
    """A RunResult serialises to the documented message fields."""
    project = projects.load({"layered": LAYERED})
    req = project.request("layered", {"a": 1, "b": 2, "c": 3}, final_vars=["unused_terminal"])
    message = project.execute(req).to_dict()
    assert set(message) == {
        "run_id",
        "pipeline",
        "status",
        "trigger",
        "outputs",
        "error",
        "attempts",
        "queued_at",
        "started_at",
        "finished_at",
        "duration_ms",
    }
    assert message["run_id"] == req.run_id
    assert (message["pipeline"], message["status"]) == ("layered", "success")
    assert message["outputs"] == {"unused_terminal": 2}
    assert (message["error"], message["attempts"]) == (None, 1)
    assert message["trigger"] == {"name": "manual", "type": "manual"}


# ------------------------------------------------------------------ sync and async pipelines


async def test_async_pipeline_runs_on_the_event_loop(projects: ProjectFactory) -> None:
    """A pipeline with ``async def`` nodes runs through the async driver on the caller's loop."""
    project = projects.load({"threads": THREADS})
    assert project.runner.prepare("threads").is_async
    with anyio.fail_after(60):
        outputs = await project.arun("threads", {"x": 1}, final_vars=["after_async", "sync_thread"])
    assert outputs["after_async"] == 20
    assert outputs["sync_thread"] == threading.current_thread().name


def test_async_pipeline_runs_from_sync_code(projects: ProjectFactory) -> None:
    """``project.run`` runs an async pipeline too (it starts an event loop for it)."""
    project = projects.load({"threads": THREADS})
    assert project.run("threads", {"x": 4}, final_vars=["after_async"]) == {"after_async": 50}


async def test_sync_pipeline_via_arun_runs_in_a_worker_thread(projects: ProjectFactory) -> None:
    """``arun`` of a sync pipeline runs it in a worker thread, keeping the event loop free."""
    project = projects.load({"sync_thread": SYNC_THREAD})
    assert not project.runner.prepare("sync_thread").is_async
    with anyio.fail_after(60):
        outputs = await project.arun("sync_thread", {"x": 1})
    assert outputs["thread_name"] != threading.current_thread().name


async def test_sync_pipeline_runs_in_the_given_executor(projects: ProjectFactory) -> None:
    """With ``runner.executor`` set (the daemon's taskiq pool) sync attempts run there,
    and a timeout still ends the attempt (the thread's work is abandoned)."""
    from concurrent.futures import ThreadPoolExecutor

    project = projects.load({"sync_thread": SYNC_THREAD, "slow": SLOW})
    with ThreadPoolExecutor(2, thread_name_prefix="taskiq-pool") as pool:
        project.runner.executor = pool
        with anyio.fail_after(60):
            outputs = await project.arun("sync_thread", {"x": 1})
            result = await project.aexecute(project.request("slow", {"seconds": 2.0}, timeout=0.2))
    assert outputs["thread_name"].startswith("taskiq-pool")
    assert result.status == "timeout"
    assert result.duration_ms < 1500


def test_sync_pipeline_via_run_stays_in_the_calling_thread(projects: ProjectFactory) -> None:
    """``run`` of a sync pipeline without a timeout executes in the calling thread."""
    project = projects.load({"sync_thread": SYNC_THREAD})
    assert project.run("sync_thread", {"x": 1}) == {"thread_name": threading.current_thread().name}


# ------------------------------------------------------------------ callbacks


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_callbacks_receive_the_run_result(projects: ProjectFactory, mode: str) -> None:
    """on_success gets the successful RunResult, on_failure the failed one."""
    project = projects.load(
        {"failing": FAILING},
        {"failing": {"run": {"on_success": "hooks.cb:ok", "on_failure": "hooks.cb.failed"}}},
        files={"hooks/__init__.py": "", "hooks/cb.py": HOOKS},
    )
    good = project.request("failing", {"x": 1}, final_vars=["third"])
    bad = project.request("failing", {"x": 50}, final_vars=["third"])
    if mode == "run":
        results = [project.execute(good), project.execute(bad)]
    else:
        results = [anyio.run(project.aexecute, good), anyio.run(project.aexecute, bad)]
    received = hook_results()
    assert [kind for kind, _ in received] == ["ok", "failed"]
    assert [r for _, r in received] == results
    assert received[0][1].outputs == {"third": 2}
    assert received[1][1].status == "failed"


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_async_callback_is_awaited(projects: ProjectFactory, mode: str) -> None:
    """An ``async def`` callback is awaited, from the sync API as well as the async one."""
    project = projects.load(
        {"failing": FAILING},
        {"failing": {"run": {"on_success": "hooks.cb.async_ok"}}},
        files={"hooks/__init__.py": "", "hooks/cb.py": HOOKS},
    )
    req = project.request("failing", {"x": 1}, final_vars=["third"])
    result = project.execute(req) if mode == "run" else anyio.run(project.aexecute, req)
    assert hook_results() == [("async_ok", result)]


def test_failing_callback_does_not_fail_the_run(projects: ProjectFactory) -> None:
    """A callback that raises is logged; the run's result stands."""
    project = projects.load(
        {"failing": FAILING},
        {"failing": {"run": {"on_success": "hooks.cb.broken"}}},
        files={"hooks/__init__.py": "", "hooks/cb.py": HOOKS},
    )
    assert project.run("failing", {"x": 1}, final_vars=["third"]) == {"third": 2}


def test_unimportable_callback_is_an_input_error(projects: ProjectFactory) -> None:
    """A callback path that does not import fails the run before it starts, naming the key."""
    project = projects.load(
        {"failing": FAILING}, {"failing": {"run": {"on_failure": "hooks.nothing.here"}}}
    )
    with pytest.raises(InputError, match=r"run\.on_failure: cannot import 'hooks\.nothing\.here'"):
        project.run("failing", {"x": 1})


# ------------------------------------------------------------------ errors users see


def test_import_error_names_file_and_line(projects: ProjectFactory) -> None:
    """A module that raises on import gives PipelineImportError naming file:line and the error."""
    project = projects.load({"bad": "import os\n\nVALUE = 1\nraise RuntimeError('no config')\n"})
    with pytest.raises(PipelineImportError) as info:
        project.run("bad")
    message = str(info.value)
    assert "pipelines/bad.py:4:" in message
    assert "RuntimeError: no config" in message


def test_syntax_error_names_file_and_line(projects: ProjectFactory) -> None:
    """A syntax error names the file and the line."""
    project = projects.load({"bad": "def ok() -> int:\n    return 1\n\ndef broken(:\n    pass\n"})
    result = project.execute(project.request("bad"))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "PipelineImportError"
    assert "pipelines/bad.py:4: syntax error" in result.error.message


def test_module_deleted_after_load_fails_the_run(projects: ProjectFactory) -> None:
    """A module file removed while the project is loaded gives a failed run naming the file."""
    base = projects.make({"gone": LAYERED})
    project = projects.open(base)
    Path(base, "pipelines", "gone.py").unlink()
    result = project.execute(project.request("gone", {"a": 1, "b": 1, "c": 1}))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "PipelineImportError"
    assert "module file not found" in result.error.message
    assert "pipelines/gone.py" in result.error.message


def test_unknown_pipeline_lists_the_existing_ones(projects: ProjectFactory) -> None:
    """Running a pipeline that does not exist names it and lists the project's pipelines."""
    project = projects.load({"alpha": LAYERED, "beta": LAYERED})
    with pytest.raises(PipelineNotFoundError) as info:
        project.run("gamma")
    assert str(info.value) == "unknown pipeline 'gamma'; pipelines in this project: alpha, beta"
    assert isinstance(info.value, LookupError)


def test_missing_input_names_input_and_nodes(projects: ProjectFactory) -> None:
    """A missing required input is named, with the nodes that need it."""
    project = projects.load({"layered": LAYERED})
    with pytest.raises(InputError) as info:
        project.run("layered", {"b": 1, "c": 1})
    assert "missing required input 'a' (needed by base, unused_terminal)" in str(info.value)


def test_unknown_final_var_suggests_close_matches(projects: ProjectFactory) -> None:
    """An unknown final var is named with the closest node names."""
    project = projects.load({"failing": FAILING})
    with pytest.raises(InputError) as info:
        project.run("failing", {"x": 1}, final_vars=["secnd"])
    assert "unknown final var(s) 'secnd' (did you mean 'second'?)" in str(info.value)


def test_failing_node_is_reported(projects: ProjectFactory) -> None:
    """When a node raises, RunResult.error names the node, the type and the message."""
    project = projects.load({"failing": FAILING})
    result = project.execute(project.request("failing", {"x": 50}, final_vars=["third"]))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.to_dict() == {
        "type": "ZeroDivisionError",
        "message": "first was 51",
        "node": "second",
    }
    with pytest.raises(ZeroDivisionError, match="first was 51"):
        project.run("failing", {"x": 50}, final_vars=["third"])


async def test_failing_async_node_is_reported(projects: ProjectFactory) -> None:
    """A failing node of an async pipeline is named too."""
    project = projects.load({"threads": THREADS + FAILING})
    with anyio.fail_after(60):
        result = await project.aexecute(project.request("threads", {"x": 50}, final_vars=["third"]))
    assert result.error is not None
    assert (result.error.type, result.error.node) == ("ZeroDivisionError", "second")


def test_bad_override_is_a_config_error(projects: ProjectFactory) -> None:
    """An invalid per-run override fails the run and names the key."""
    project = projects.load({"failing": FAILING})
    result = project.execute(project.request("failing", {"x": 1}, executor="gpu"))
    assert result.error is not None
    assert result.error.type == "ConfigError"
    assert "run overrides: executor.type" in result.error.message


def test_unknown_run_option_is_a_type_error(projects: ProjectFactory) -> None:
    """A misspelt keyword of ``run`` is a TypeError naming it."""
    project = projects.load({"failing": FAILING})
    with pytest.raises(TypeError, match="unknown run option"):
        project.run("failing", {"x": 1}, max_retry=3)


def test_every_error_is_a_flowerpower_error(projects: ProjectFactory) -> None:
    """Errors raised on purpose share one root class."""
    project = projects.load({"failing": FAILING})
    with pytest.raises(FlowerPowerError):
        project.run("failing", {})


def test_show_describes_the_dag(projects: ProjectFactory) -> None:
    """``show`` lists the pipeline's nodes with their roles and dependencies."""
    project = projects.load({"failing": FAILING})
    info = project.show("failing")
    assert info["final_vars"] == ["third"]
    assert info["async"] is False
    nodes = {n["name"]: n for n in info["nodes"]}
    assert nodes["x"]["role"] == "input"
    assert nodes["second"]["depends_on"] == ["first"]
