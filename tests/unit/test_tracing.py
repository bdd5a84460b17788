"""Tracing in one process: the SDK's InMemorySpanExporter sees trigger -> queue -> run ->
Hamilton's node spans; off, the hooks do nothing and import nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowerpower_daemon import tracing
from flowerpower_daemon.dispatch.dispatcher import Dispatcher
from flowerpower_daemon.errors import ConfigError
from flowerpower_daemon.project.models import RunRequest, RunResult, TriggerInfo
from flowerpower_daemon.queue.broker import (
    InProcessRequest,
    RunExecutor,
    create_broker,
    register_run_task,
)
from flowerpower_daemon.settings import MqttTrigger, QueueSettings, Settings
from flowerpower_daemon.sources.base import TriggerEvent
from tests.unit.conftest import ProjectFactory

TEMPERATURE = """
def celsius(temperature: float) -> float:
    return float(temperature)

def fahrenheit(celsius: float) -> float:
    return celsius * 9.0 / 5.0 + 32.0
"""
DEVICE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
DEVICE_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.uninstall()


class _Sink:
    """Keeps each result with the user properties its message would carry."""

    def __init__(self) -> None:
        self.sent: list[tuple[RunResult, tuple[tuple[str, str], ...]]] = []

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        self.sent.append((result, tracing.reply_properties()))


def _hex(n: int, width: int) -> str:
    return f"{n:0{width}x}"


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


async def _dispatch(projects: ProjectFactory, event: TriggerEvent) -> _Sink:
    """``event`` through the dispatcher, the memory queue and the runner, as the daemon does."""
    project = projects.load({"temperature": TEMPERATURE})
    trigger = MqttTrigger.model_validate(
        {"name": "temp", "type": "mqtt", "pipeline": "temperature", "topic": "s/{device}"}
    )
    sink = _Sink()
    broker = create_broker(QueueSettings())
    task = register_run_task(broker, RunExecutor(project.runner, sink))
    await broker.startup()

    async def kiq(request: RunRequest) -> object:
        return await task.kicker().with_task_id(request.run_id).kiq(InProcessRequest(request))

    dispatcher = Dispatcher(Settings(), [trigger], kiq=kiq, sink=sink, remote=False)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as runs:
                await dispatcher.submit(event, runs)
    finally:
        await broker.shutdown()
    return sink


def _event(
    payload: dict[str, object], properties: tuple[tuple[str, str], ...] = ()
) -> TriggerEvent:
    fields = {"device": "d1"}
    return TriggerEvent(
        "temp",
        "mqtt",
        payload=orjson.dumps(payload),
        inputs=fields,
        meta={"topic": "s/d1", "fields": fields, "user_properties": properties},
    )


@pytest.mark.parametrize("in_json", [False, True], ids=["user-property", "json-field"])
async def test_one_trace_under_the_devices_traceparent(
    projects: ProjectFactory, exporter: InMemorySpanExporter, in_json: bool
) -> None:
    """trigger -> queue -> run -> Hamilton graph -> nodes, one trace, parented by the device's
    ``traceparent``; the result's user property is the run span's ``traceparent``."""
    payload: dict[str, object] = {"temperature": 20}
    props: tuple[tuple[str, str], ...] = (("traceparent", TRACEPARENT),)
    if in_json:
        payload["traceparent"], props = TRACEPARENT, ()
    sink = await _dispatch(projects, _event(payload, props))
    [(result, reply_props)] = sink.sent
    assert result.status == "success"
    spans = exporter.get_finished_spans()
    assert {_hex(s.context.trace_id, 32) for s in spans} == {DEVICE_TRACE}
    named = _by_name(spans)
    trigger, queue, run = (
        named["trigger temp"],
        named["queue temperature"],
        named["run temperature"],
    )
    assert trigger.parent is not None and _hex(trigger.parent.span_id, 16) == DEVICE_SPAN
    assert trigger.parent.is_remote
    assert queue.parent is not None and queue.parent.span_id == trigger.context.span_id
    assert run.parent is not None and run.parent.span_id == trigger.context.span_id
    [graph] = [s for s in spans if s.parent is not None and s.parent.span_id == run.context.span_id]
    nodes = {
        s.name for s in spans if s.parent is not None and s.parent.span_id == graph.context.span_id
    }
    assert nodes == {"celsius", "fahrenheit"}
    assert run.attributes is not None and run.attributes["flowerpower.status"] == "success"
    assert trigger.attributes is not None
    assert trigger.attributes["messaging.destination.name"] == "s/d1"
    assert reply_props == (
        ("traceparent", f"00-{DEVICE_TRACE}-{_hex(run.context.span_id, 16)}-01"),
    )


async def test_without_a_traceparent_the_trigger_is_the_root(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """No context from the device: a new trace, rooted at the trigger span."""
    await _dispatch(projects, _event({"temperature": 20}))
    named = _by_name(exporter.get_finished_spans())
    assert named["trigger temp"].parent is None
    assert len({s.context.trace_id for s in named.values()}) == 1


async def test_a_failed_run_is_an_error_span(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """A run that fails marks its span ERROR with the error type."""
    await _dispatch(projects, _event({"temperature": "hot"}))
    run = _by_name(exporter.get_finished_spans())["run temperature"]
    assert run.status.status_code.name == "ERROR"
    assert run.attributes is not None and run.attributes["flowerpower.status"] == "failed"


async def test_a_manual_run_starts_its_own_trace(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """A request no trigger produced (``flowerpowerctl run``) gets a root ``trigger manual`` span."""
    project = projects.load({"temperature": TEMPERATURE})
    sink = _Sink()
    executor = RunExecutor(project.runner, sink)

    async def kiq(request: RunRequest) -> object:
        return await executor(InProcessRequest(request))

    dispatcher = Dispatcher(Settings(), [], kiq=kiq, sink=sink, remote=False)
    request = RunRequest("temperature", inputs={"temperature": 1.0}, unknown_inputs="ignore")
    with anyio.fail_after(30):
        await dispatcher.run_request(request)
    named = _by_name(exporter.get_finished_spans())
    trigger, run = named["trigger manual"], named["run temperature"]
    assert trigger.parent is None
    assert run.parent is not None and run.parent.span_id == trigger.context.span_id
    assert trigger.attributes is not None
    assert trigger.attributes["flowerpower.trigger.type"] == "manual"


async def test_pipeline_code_spans_nest_under_its_node(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """A node using the OpenTelemetry API sees its own node span as the current one."""
    module = """
        from opentelemetry import trace

        def span_id(x: int) -> str:
            return format(trace.get_current_span().get_span_context().span_id, "016x")
    """
    project = projects.load({"spanned": module})
    sink = _Sink()
    executor = RunExecutor(project.runner, sink)
    with anyio.fail_after(30):
        await executor(InProcessRequest(RunRequest("spanned", inputs={"x": 1})))
    [(result, _)] = sink.sent
    node = _by_name(exporter.get_finished_spans())["span_id"]
    assert result.outputs["span_id"] == _hex(node.context.span_id, 16)


async def test_async_pipelines_get_node_spans_too(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """On Hamilton's async driver the node spans hang under the run span as well."""
    module = """
        import asyncio

        async def slow(x: int) -> int:
            await asyncio.sleep(0.01)
            return x

        async def quick(x: int) -> int:
            return x * 2

        def total(slow: int, quick: int) -> int:
            return slow + quick
    """
    project = projects.load({"asyncpipe": module})
    sink = _Sink()
    with anyio.fail_after(30):
        await RunExecutor(project.runner, sink)(
            InProcessRequest(RunRequest("asyncpipe", inputs={"x": 1}))
        )
    [(result, _)] = sink.sent
    assert result.outputs == {"total": 3}
    spans = exporter.get_finished_spans()
    run = _by_name(spans)["run asyncpipe"]
    [graph] = [s for s in spans if s.parent is not None and s.parent.span_id == run.context.span_id]
    nodes = {
        s.name for s in spans if s.parent is not None and s.parent.span_id == graph.context.span_id
    }
    assert nodes == {"slow", "quick", "total"}


async def test_node_versions_are_hashed_once_per_driver_not_per_run(
    projects: ProjectFactory, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hamilton's tracer hashes every function's source for its version attributes; with a
    new graph object per run that was 2 ms a run: here it happens at the first run only."""
    from hamilton import graph_types

    hashed: list[object] = []
    original = graph_types.hash_source_code

    def counting(source: object, strip: bool = False) -> str:
        hashed.append(source)
        return original(source, strip=strip)  # type: ignore[no-any-return]

    monkeypatch.setattr(graph_types, "hash_source_code", counting)
    project = projects.load({"temperature": TEMPERATURE})
    executor = RunExecutor(project.runner, _Sink())
    counts = []
    with anyio.fail_after(30):
        for _ in range(3):
            await executor(InProcessRequest(RunRequest("temperature", inputs={"temperature": 1})))
            counts.append(len(hashed))
    assert counts[0] >= 2 and counts == [counts[0]] * 3  # all at the first run
    node = _by_name(exporter.get_finished_spans())["celsius"]
    assert node.attributes is not None and node.attributes["node_version"]


def test_the_context_crosses_the_queue_in_the_request() -> None:
    """``RunRequest.trace`` survives the dict a Redis message carries (and is absent when unset)."""
    request = RunRequest("p", trigger=TriggerInfo(), trace={"traceparent": TRACEPARENT})
    assert RunRequest.from_dict(orjson.loads(orjson.dumps(request.to_dict()))).trace == {
        "traceparent": TRACEPARENT
    }
    assert "trace" not in RunRequest("p").to_dict()
    for bad in ("00-abc", ["x"], {"traceparent": 1}, None):
        assert RunRequest.from_dict({"pipeline": "p", "trace": bad}).trace is None


def test_off_the_hooks_do_nothing() -> None:
    """Tracing off: no context, no span, no user property."""
    assert not tracing.active()
    assert tracing.trigger(RunRequest("p")) is None
    assert tracing.start_run(RunRequest("p")) is None
    assert tracing.reply_properties() == ()


def test_off_nothing_of_opentelemetry_is_imported(tmp_path: Path) -> None:
    """The daemon's modules with tracing off import no OpenTelemetry (no cost at start).

    Other libraries may import it on their own (taskiq imports fastapi when it is
    installed, as mlflow-skinny installs it, and fastapi imports OpenTelemetry), so
    the test records who asks for it: no module of this package may import it.
    """
    code = (
        "import sys, traceback\n"
        "asked = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith('<')]\n"
        "            if '/flowerpower_daemon/' in frames[-1].filename:\n"
        "                asked.append(f'{frames[-1].filename}:{frames[-1].lineno} {name}')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import flowerpower_daemon.service.daemon, flowerpower_daemon.service.worker\n"
        "import flowerpower_daemon.queue.broker, flowerpower_daemon.dispatch.dispatcher\n"
        "from flowerpower_daemon import tracing\n"
        "assert tracing.configure(environ={}) is False\n"
        "print(asked)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
    ],
)
def test_the_switch_is_otel_traces_exporter(env: dict[str, str]) -> None:
    """Unset, ``none`` or the SDK disabled: tracing stays off."""
    assert tracing.configure(environ=env) is False
    assert not tracing.active()


def test_an_unknown_exporter_is_a_clear_error() -> None:
    """An exporter nobody installed is a config error naming the variable and the known ones."""
    with pytest.raises(ConfigError) as info:
        tracing.configure(environ={"OTEL_TRACES_EXPORTER": "jaegr"})
    [problem] = info.value.problems
    assert (problem.file, problem.key) == ("environment", "OTEL_TRACES_EXPORTER")
    assert "'jaegr'" in problem.message and "otlp" in problem.message
    assert not tracing.active()


def test_an_unknown_otlp_protocol_is_a_clear_error() -> None:
    """``OTEL_EXPORTER_OTLP_PROTOCOL`` other than grpc or http/protobuf is named."""
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json'"):
        tracing.configure(environ=env)


def test_without_the_extra_enabling_names_it() -> None:
    """OTEL_TRACES_EXPORTER set without OpenTelemetry installed: one line naming the extra."""
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from flowerpower_daemon import tracing\n"
        "try:\n"
        "    tracing.configure(environ={'OTEL_TRACES_EXPORTER': 'otlp'})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    line = out.stdout.strip()
    assert line.startswith("DependencyMissingError OTEL_TRACES_EXPORTER=otlp needs OpenTelemetry")
    assert line.endswith("pip install 'flowerpower-daemon[otel]'") and "\n" not in line


@pytest.mark.parametrize("executor", ["threadpool", "local-future"])
async def test_threadpool_node_spans_stay_under_the_run(
    projects: ProjectFactory, exporter: InMemorySpanExporter, executor: str
) -> None:
    """A pipeline on FlowerPower's ``threadpool`` executor (the default of projects that
    ``flowerpower new`` makes) runs its nodes in pool threads: their spans, and pipeline
    code using the OpenTelemetry API, still hang under the run's graph span."""
    module = """
        from opentelemetry import trace

        def span_id(x: int) -> str:
            return format(trace.get_current_span().get_span_context().span_id, "016x")

        def doubled(x: int) -> int:
            return 2 * x
    """
    run: dict[str, object] = {"final_vars": ["span_id", "doubled"]}
    if executor == "threadpool":
        run["executor"] = {"type": "threadpool", "max_workers": 2}
    else:
        run["with_adapter"] = {"future": True}
    project = projects.load({"pooled": module}, {"pooled": {"run": run}})
    sink = _Sink()
    with anyio.fail_after(30):
        await RunExecutor(project.runner, sink)(
            InProcessRequest(RunRequest("pooled", inputs={"x": 1}))
        )
    [(result, _)] = sink.sent
    assert result.status == "success", result.error
    spans = exporter.get_finished_spans()
    named = _by_name(spans)
    run_span = named["run pooled"]
    [graph] = [
        s for s in spans if s.parent is not None and s.parent.span_id == run_span.context.span_id
    ]
    for node in ("span_id", "doubled"):
        span = named[node]
        assert span.context.trace_id == run_span.context.trace_id, node
        assert span.parent is not None and span.parent.span_id == graph.context.span_id, node
    assert result.outputs["span_id"] == _hex(named["span_id"].context.span_id, 16)


async def test_parallelizable_task_spans_stay_in_the_runs_trace(
    projects: ProjectFactory, exporter: InMemorySpanExporter
) -> None:
    """``Parallelizable`` on the ``threadpool`` executor (Hamilton's task executor): every
    task and node span is in the run's trace."""
    module = """
        from hamilton.htypes import Collect, Parallelizable

        def item(n: int) -> Parallelizable[int]:
            yield from range(n)

        def squared(item: int) -> int:
            return item * item

        def total(squared: Collect[int]) -> int:
            return sum(squared)
    """
    run = {"final_vars": ["total"], "executor": {"type": "threadpool", "max_workers": 2}}
    project = projects.load({"fanned": module}, {"fanned": {"run": run}})
    sink = _Sink()
    with anyio.fail_after(30):
        await RunExecutor(project.runner, sink)(
            InProcessRequest(RunRequest("fanned", inputs={"n": 3}))
        )
    [(result, _)] = sink.sent
    assert result.status == "success", result.error
    assert result.outputs["total"] == 5
    spans = exporter.get_finished_spans()
    run_trace = _by_name(spans)["run fanned"].context.trace_id
    squares = [s for s in spans if s.name == "squared"]
    assert len(squares) == 3
    assert {s.context.trace_id for s in spans} == {run_trace}


def test_with_adapter_opentelemetry_without_the_extra_names_only_ours(tmp_path: Path) -> None:
    """``with_adapter.opentelemetry`` without OpenTelemetry: the one line names the missing
    module and our extra, not the install hint inside Hamilton's plugin (an old package
    name, ``sf-hamilton[opentelemetry]``)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "sensors"
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from flowerpower_daemon.cli import main\n"
        "sys.argv = ['flowerpower-daemon', 'pipeline', 'run', 'stats', '--base-dir', sys.argv[1],\n"
        "            '--with-adapter', '{\"opentelemetry\": true}']\n"
        "sys.exit(main())\n"
    )
    env = {**os.environ, "HAMILTON_TELEMETRY_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "with_adapter.opentelemetry" in line and "(opentelemetry)" in line, line
    assert line.endswith("pip install 'flowerpower-daemon[otel]'"), line
    assert "sf-hamilton" not in line
