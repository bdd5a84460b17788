"""Every use of Hamilton's API lives here (and in :mod:`._hamilton_plan`, the fast
executor this module hands out), so a Hamilton upgrade touches these two files.

Importing this module imports Hamilton (about 0.4 s, pulling in pandas), so
the rest of the package imports it lazily, only when a pipeline is built.
Hamilton's telemetry is switched off before the import.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Protocol, TypedDict

os.environ.setdefault("HAMILTON_TELEMETRY_ENABLED", "false")

from hamilton import registry as _registry

# Hamilton loads a plugin for each library it finds installed, when its driver is first
# imported. Its mlflow plugin imports mlflow: about 0.75 s and 970 modules at start-up (and
# their memory), although only ``with_adapter.mlflow`` (mlflowtracker.py, which loads the
# plugin itself) needs it. A pipeline module using ``to.mlflow`` without the tracker imports
# ``hamilton.plugins.mlflow_extensions`` itself.
LAZY_EXTENSIONS = ("mlflow",)
_registry.HAMILTON_EXTENSIONS = tuple(
    name for name in _registry.HAMILTON_EXTENSIONS if name not in LAZY_EXTENSIONS
)

from hamilton import async_driver, driver, htypes
from hamilton import node as h_node
from hamilton.execution import executors
from hamilton.execution.graph_functions import node_is_required_by_anything

from .. import tracing
from ..errors import DependencyMissingError, InputError
from ._hamilton_plan import FastExecutor, fast_executor
from .config import AdapterConfig, CacheConfig, ExecutorConfig, WithAdapterConfig
from .inputtypes import Check, compile_check, type_label

__all__ = [
    "DagInfo",
    "Driver",
    "FastExecutor",
    "NodeRow",
    "RayKwargs",
    "build_driver",
    "describe_nodes",
    "execute_async",
    "fast_executor",
    "init_async_driver",
    "is_async_modules",
    "is_input_validation_error",
    "ray_executor_kwargs",
]

_HAMILTON_FILES = (os.path.dirname(driver.__file__),)


class Driver(Protocol):
    """What the runner calls on a built driver (Hamilton's drivers are untyped).

    The sync driver returns the outputs; the async one a coroutine of them
    (the runner awaits it through :func:`execute_async`).
    """

    def execute(self, final_vars: list[str], *, inputs: dict[str, object]) -> object: ...


class RayKwargs(TypedDict):
    """The keyword arguments of Hamilton's ``RayTaskExecutor`` (:func:`ray_executor_kwargs`)."""

    num_cpus: object  # executor.num_cpus, else ray_init_config's (Ray checks it)
    ray_init_config: dict[str, object]
    skip_init: bool


class NodeRow(TypedDict):
    """One DAG node as ``pipeline show`` lists it (:func:`describe_nodes`)."""

    name: str
    type: str
    role: str
    depends_on: list[str]
    doc: str


class _DropHelpBanner(logging.Filter):
    """Drop Hamilton's per-failure banners and node dumps: the RunResult reports the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "Oh no an error" not in text and "encountered an error" not in text


for _name in ("hamilton.driver", "hamilton.async_driver", "hamilton.execution.graph_functions"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropHelpBanner) for f in _logger.filters):
        _logger.addFilter(_DropHelpBanner())


def _extra(name: str, extra: str, exc: ImportError) -> DependencyMissingError:
    return DependencyMissingError(
        f"{name} needs an optional dependency that is not installed ({_missing(exc)}); "
        f"install it with: pip install 'flowerpower-daemon[{extra}]'"
    )


def _missing(exc: ImportError) -> str:
    """The module that is missing: Hamilton's plugins re-raise the ImportError with their own
    install hint (naming an old package), chained to the one that names the module."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ImportError) and seen.name:
            return seen.name
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def is_async_modules(modules: Iterable[ModuleType]) -> bool:
    """True when any function defined in ``modules`` is ``async def``."""
    for module in modules:
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and inspect.iscoroutinefunction(fn):
                return True
    return False


def _return_type(fn: Callable[..., object]) -> object:
    """``fn``'s return annotation, resolved when it is a string (PEP 563 modules)."""
    try:
        return typing.get_type_hints(fn).get("return", inspect.Signature.empty)
    except Exception:
        return inspect.signature(fn).return_annotation


def _has_parallelizable(modules: Iterable[ModuleType]) -> bool:
    for module in modules:
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            ret = _return_type(fn)
            if ret is not inspect.Signature.empty and not isinstance(ret, str):
                try:
                    if htypes.is_parallelizable_type(ret):
                        return True
                except TypeError:
                    continue
    return False


def _adapters(
    flags: WithAdapterConfig, settings: AdapterConfig, pipeline: str, is_async: bool
) -> list[object]:
    out: list[object] = []
    if flags.progressbar and not is_async:
        try:
            from .progress import ProgressBar
        except ImportError as exc:
            raise _extra("with_adapter.progressbar", "progressbar", exc) from None
        out.append(ProgressBar(desc=pipeline))
    if flags.hamilton_tracker:
        try:
            from . import uitracker
        except ImportError as exc:
            raise _extra("with_adapter.hamilton_tracker", "tracker", exc) from None
        out.append(uitracker.tracker(settings.hamilton_tracker, pipeline, is_async))
    if flags.mlflow:
        try:
            from . import mlflowtracker
        except ImportError as exc:
            raise _extra("with_adapter.mlflow", "mlflow", exc) from None
        out.append(mlflowtracker.MlflowRuns(settings.mlflow, pipeline))
    # Node spans: the pipeline's own exporter (with_adapter.opentelemetry: FlowerPower's
    # host/port) or, when the daemon traces its runs, under each run's span.
    if flags.opentelemetry or tracing.active():
        try:
            tracer_class = _opentelemetry_tracer_class()
        except ImportError as exc:
            raise _extra("with_adapter.opentelemetry", "otel", exc) from None
        tracer = tracing.hamilton_tracer(
            settings.opentelemetry, pipeline, endpoint=flags.opentelemetry
        )
        out.append(tracer_class(tracer=tracer))
    return out


@functools.cache
def _opentelemetry_tracer_class() -> type:
    """Hamilton's ``OpenTelemetryTracer``, hashing the graph's source once per driver.

    Its graph span carries ``graph.version`` and each node span the node's
    version: hashes of the functions' source (``inspect.getsource`` and an
    ``ast`` round trip). Hamilton hands the hook a new ``HamiltonGraph`` every
    run, so the stock tracer hashed every function again at every run (2 ms
    a run for three nodes, 20 times the run itself). A driver's graph never
    changes: the first run's ``HamiltonGraph`` keeps its versions computed.
    """
    from hamilton.plugins import h_opentelemetry

    class OpenTelemetryTracer(h_opentelemetry.OpenTelemetryTracer):  # type: ignore[misc]
        _graph: object = None

        def run_before_graph_execution(self, *, graph: object, **kwargs: Any) -> None:
            if self._graph is None:
                self._graph = graph
            super().run_before_graph_execution(graph=self._graph, **kwargs)

    return OpenTelemetryTracer


def ray_executor_kwargs(executor: ExecutorConfig, settings: AdapterConfig) -> RayKwargs:
    """Keyword arguments of Hamilton's ``RayTaskExecutor`` for this pipeline.

    ``ray_init_config`` is ``adapter.ray.ray_init_config`` (``null`` is ``{}``;
    ``executor.num_cpus`` wins over a ``num_cpus`` in it). The executor calls
    ``ray.init`` before and ``ray.shutdown`` after every run unless ``skip_init``:
    ``adapter.ray.shutdown_ray_on_completion: true`` keeps that; ``false``
    (FlowerPower's default) sets ``skip_init`` and Ray is started once (see
    :func:`_start_ray`) and left running for the next runs.
    """
    init = dict(settings.ray.ray_init_config or {})
    in_config = init.pop("num_cpus", None)
    num_cpus = executor.num_cpus if executor.num_cpus is not None else in_config
    return {
        "num_cpus": num_cpus,
        "ray_init_config": init,
        "skip_init": not settings.ray.shutdown_ray_on_completion,
    }


def _start_ray(kwargs: RayKwargs) -> None:
    """``ray.init`` as the executor would call it, once per process."""
    ray = importlib.import_module("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=kwargs["num_cpus"], **kwargs["ray_init_config"])


class _ContextThreadPool(ThreadPoolExecutor):
    """A thread pool whose tasks run in a copy of the submitter's context.

    Hamilton's ``threadpool`` executors run nodes (and their lifecycle hooks)
    in pool threads, which start from an empty context: without the copy the
    run's trace span (so Hamilton's node spans and pipeline code using the
    OpenTelemetry API) and the run bound for the tracking adapters are lost
    there, and each node span starts a trace of its own.
    """

    def submit(  # type: ignore[override]
        self, fn: Callable[..., object], /, *args: object, **kwargs: object
    ) -> Future[object]:
        context = contextvars.copy_context()
        return super().submit(lambda: context.run(fn, *args, **kwargs))


class _ContextThreadingExecutor(executors.MultiThreadingExecutor):  # type: ignore[misc]
    """Hamilton's task executor (``Parallelizable`` pipelines) on a :class:`_ContextThreadPool`."""

    def create_pool(self) -> ThreadPoolExecutor:
        return _ContextThreadPool(max_workers=self.max_tasks)


def _apply_executor(
    builder: driver.Builder,
    executor: ExecutorConfig,
    modules: Sequence[ModuleType],
    settings: AdapterConfig,
    future_flag: bool,
) -> None:
    kind = executor.type
    workers = executor.max_workers or min(32, (os.cpu_count() or 1) + 4)
    if kind == "threadpool" or (kind == "local" and future_flag):
        if _has_parallelizable(modules):
            builder.enable_dynamic_execution(allow_experimental_mode=True)
            builder.with_remote_executor(_ContextThreadingExecutor(max_tasks=workers))
        else:
            from hamilton.plugins import h_threadpool

            adapter = h_threadpool.FutureAdapter(max_workers=workers)
            adapter.executor = _ContextThreadPool(max_workers=workers)
            builder.with_adapters(adapter)
    elif kind == "processpool":
        builder.enable_dynamic_execution(allow_experimental_mode=True)
        builder.with_remote_executor(executors.MultiProcessingExecutor(max_tasks=workers))
    elif kind == "ray":
        try:
            from hamilton.plugins import h_ray
        except ImportError as exc:
            raise _extra("executor 'ray'", "ray", exc) from None
        kwargs = ray_executor_kwargs(executor, settings)
        if kwargs["skip_init"]:
            _start_ray(kwargs)
        builder.enable_dynamic_execution(allow_experimental_mode=True)
        builder.with_remote_executor(h_ray.RayTaskExecutor(**kwargs))
    elif kind == "dask":
        try:
            distributed = importlib.import_module("dask.distributed")
            from hamilton.plugins import h_dask
        except ImportError as exc:
            raise _extra("executor 'dask'", "dask", exc) from None
        cluster = distributed.LocalCluster(n_workers=executor.max_workers or 2, processes=False)
        builder.enable_dynamic_execution(allow_experimental_mode=True)
        builder.with_remote_executor(h_dask.DaskExecutor(client=distributed.Client(cluster)))


def build_driver(
    *,
    pipeline: str,
    modules: Sequence[ModuleType],
    config: Mapping[str, object],
    executor: ExecutorConfig,
    with_adapter: WithAdapterConfig,
    adapter_settings: AdapterConfig,
    cache: CacheConfig,
    cache_dir: str,
    is_async: bool,
) -> Driver:
    """Build a Hamilton driver (sync, or async without its ``ainit``) for one pipeline setup."""
    adapters = _adapters(with_adapter, adapter_settings, pipeline, is_async)
    if is_async:
        if executor.type != "local":
            raise InputError(
                f"pipeline {pipeline!r} has async functions; it runs on the async driver and "
                f"cannot use executor {executor.type!r} (use 'local')"
            )
        ab = async_driver.Builder().with_modules(*modules).with_config(dict(config))
        if adapters:
            ab = ab.with_adapters(*adapters)
        if cache.enabled:
            raise InputError(
                f"pipeline {pipeline!r}: Hamilton's async driver does not support cache"
            )
        built: Driver = ab.build_without_init()
        return built
    builder = driver.Builder().with_modules(*modules).with_config(dict(config))
    builder.allow_module_overrides()
    _apply_executor(builder, executor, modules, adapter_settings, with_adapter.future)
    if adapters:
        builder.with_adapters(*adapters)
    if cache.enabled:
        builder.with_cache(
            path=cache.path or cache_dir,
            recompute=list(cache.recompute) or None,
            ignore=list(cache.ignore) or None,
            disable=list(cache.disable) or None,
            default_behavior=cache.default_behavior,
        )
    dr: Driver = builder.build()
    return dr


async def init_async_driver(dr: Any) -> object:
    """Run the async driver's ``ainit`` (its adapters' async set-up)."""
    return await dr.ainit()


async def execute_async(dr: Any, final_vars: list[str], inputs: dict[str, object]) -> object:
    """Execute on the async driver, validating inputs first as the sync driver does.

    Hamilton's async driver skips ``validate_inputs``: a missing input would
    surface as a ``NotImplementedError`` from deep inside the graph (and be
    retried), a wrongly typed one would reach the node.
    """
    nodes, user_nodes = dr.graph.get_upstream_nodes(final_vars, inputs)
    driver.Driver.validate_inputs(dr.graph, dr.adapter, user_nodes, inputs, nodes)
    return await dr.execute(final_vars, inputs=inputs)


@dataclass(frozen=True, slots=True)
class DagInfo:
    """What the runner needs to know about a built DAG, computed once per driver."""

    nodes: frozenset[str]
    terminal: tuple[str, ...]
    #: input name -> its annotation
    inputs: Mapping[str, object]
    config_keys: frozenset[str]

    @classmethod
    def of(cls, dr: Any) -> DagInfo:
        graph = dr.graph
        nodes = graph.nodes
        terminal = tuple(
            sorted(
                name
                for name, n in nodes.items()
                if not n.user_defined and not n.depended_on_by and not name.startswith("__")
            )
        )
        inputs = {name: n.type for name, n in nodes.items() if n.user_defined}
        return cls(
            nodes=frozenset(nodes),
            terminal=terminal,
            inputs=inputs,
            config_keys=frozenset(graph.config),
        )

    def missing_inputs(
        self, dr: Any, final_vars: Sequence[str], inputs: Mapping[str, object]
    ) -> dict[str, list[str]]:
        """Required inputs absent from ``inputs``, each with the nodes that need it."""
        graph = dr.graph
        needed, user_nodes = graph.get_upstream_nodes(list(final_vars), dict(inputs))
        missing: dict[str, list[str]] = {}
        for un in user_nodes:
            if un.name in inputs or un.name in self.config_keys:
                continue
            if node_is_required_by_anything(un, needed):
                missing[un.name] = sorted(d.name for d in un.depended_on_by if d in needed)
        return missing

    @property
    def input_names(self) -> frozenset[str]:
        """The inputs a request may give: user-defined nodes less Hamilton config keys."""
        return frozenset(self.inputs) - self.config_keys

    def input_checks(self) -> dict[str, Check]:
        """A deep type check per typed input (``inputtypes``; none for ``Any``/``object``).

        Hamilton lets ``None`` through for any input and checks at most the
        outer type: ``""`` or ``["x", 1]`` for ``list[float]`` would reach the
        node and fail there (retryable), or succeed on the wrong data.
        """
        checks = {name: compile_check(tp) for name, tp in self.inputs.items()}
        return {name: check for name, check in checks.items() if check is not None}

    def type_mismatches(self, inputs: Mapping[str, object]) -> dict[str, str]:
        """Inputs whose value does not fit the declared parameter type (name -> why)."""
        bad: dict[str, str] = {}
        for name, check in self.input_checks().items():
            if name in inputs:
                why = check(inputs[name])
                if why is not None:
                    bad[name] = why
        return bad


def is_input_validation_error(exc: BaseException) -> bool:
    """True when ``exc`` came from Hamilton's own input / graph validation, not from a node."""
    tb: TracebackType | None = exc.__traceback__
    last_ours = False
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in ("validate_inputs", "get_upstream_nodes", "_create_final_vars"):
            last_ours = True
        tb = tb.tb_next
    return last_ours


def describe_nodes(dr: Any) -> list[NodeRow]:
    """One row per DAG node: name, type (as annotated: ``list[float]``), role, dependencies
    (for ``pipeline show``).

    A user-defined node is an ``input``, or ``config`` when a Hamilton config
    key provides it (``@config.when``): a request cannot give that one.
    """
    rows: list[NodeRow] = []
    config_keys = dr.graph.config
    for name, n in sorted(dr.graph.nodes.items()):
        role = (
            ("config" if name in config_keys else "input")
            if n.user_defined
            else (
                "expand"
                if n.node_role == h_node.NodeType.EXPAND
                else ("collect" if n.node_role == h_node.NodeType.COLLECT else "function")
            )
        )
        rows.append(
            {
                "name": name,
                "type": type_label(n.type),
                "role": role,
                "depends_on": sorted(d.name for d in n.dependencies),
                "doc": (n.documentation or "").strip().splitlines()[0] if n.documentation else "",
            }
        )
    return rows
