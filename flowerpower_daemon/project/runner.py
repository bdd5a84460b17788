"""Build Hamilton drivers once, execute runs with retries, timeouts and callbacks.

One async entry point, :meth:`PipelineRunner.run`; :meth:`run_sync` is a
thin wrapper for the CLI and the sync API that executes in the calling
thread (no event loop, no thread hop) when the run needs neither a timeout
nor the async driver, and otherwise drives :meth:`run` with ``anyio.run``.
Both loops share :class:`~.attempts.Attempts`, which owns every retry
decision; :class:`~.prepared.Prepared` holds what a run needs, built once
per (pipeline, overrides).

Per pipeline the runner keeps the imported modules (re-imported when their
files change, checked at most once per ``check_interval`` seconds) and one
driver per effective (config, executor, adapters, cache): a second run pays
for neither import nor graph building.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread
import orjson
import structlog
from pydantic import ValidationError

from ..errors import ConfigError, FlowerPowerError, InputError, PipelineImportError, RunTimeoutError
from .attempts import Attempts, as_mapping, failed_before_start, first_try_result
from .config import RunConfig, format_validation_error
from .models import RunRequest, RunResult, utcnow
from .modules import import_pipeline_module, module_name_for
from .prepared import Callback, Prepared, assemble
from .registry import ProjectSpec
from .tracking import bind

if TYPE_CHECKING:
    from ._hamilton import DagInfo, Driver, FastExecutor

__all__ = ["PipelineRunner", "Prepared"]

log = structlog.get_logger("flowerpower_daemon.runner")

_K = TypeVar("_K")
_V = TypeVar("_V")

_MERGED_OVERRIDES = ("config", "with_adapter")

#: An executor's ``run_soon(fn, *args)`` (``queue.threads.ElasticThreadPool`` has one):
#: ``fn(*args)`` in a thread, its outcome as an asyncio future.
_RunSoon = Callable[..., "asyncio.Future[Mapping[str, object]]"]


@dataclass(slots=True)
class _ModuleState:
    modules: tuple[ModuleType, ...]
    files: tuple[str, ...]
    signature: tuple[object, ...]
    generation: int
    checked_at: float
    is_async: bool


class PipelineRunner:
    """Runs the pipelines of one project; safe to share between threads and tasks."""

    def __init__(
        self,
        spec: ProjectSpec,
        *,
        cache_dir: str = ".hamilton_cache",
        max_threads: int | None = None,
        check_interval: float = 1.0,
        rng: random.Random | None = None,
        max_prepared: int = 256,
    ) -> None:
        self._spec = spec
        # Bounds the prepared runs and drivers kept: a config hook that returns a new
        # config per message must not keep a Hamilton driver per message.
        self._max_prepared = max_prepared
        self._cache_dir = cache_dir
        self._check_interval = check_interval
        self._rng = rng or random.Random()
        self._max_threads = max_threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._lock = threading.RLock()
        self._modules: dict[str, _ModuleState] = {}
        self._drivers: dict[tuple[str, int, bytes], tuple[Driver, DagInfo]] = {}
        self._prepared: dict[tuple[str, bytes], Prepared] = {}
        # id(driver) -> (driver, its fast executor or None): see _hamilton.FastExecutor.
        # The driver is kept in the entry so that its id cannot be reused meanwhile.
        self._fast: dict[int, tuple[Driver, FastExecutor | None]] = {}
        #: Where sync attempts run when set (the daemon and the worker pass theirs);
        #: else anyio's thread pool, bounded by ``max_threads``.
        self.executor: Executor | None = None

    @property
    def spec(self) -> ProjectSpec:
        return self._spec

    def update_spec(self, spec: ProjectSpec) -> None:
        """Swap in a re-validated project; drivers are rebuilt lazily on next use."""
        with self._lock:
            self._spec = spec
            self._modules.clear()
            self._drivers.clear()
            self._prepared.clear()
            self._fast.clear()

    # ---------------------------------------------------------------- preparation

    def _overrides_key(self, overrides: Mapping[str, object]) -> bytes:
        if not overrides:
            return b""
        return orjson.dumps(overrides, option=orjson.OPT_SORT_KEYS, default=repr)

    def cached(self, request: RunRequest) -> Prepared | None:
        """The prepared run if it is built and its module was checked recently; no I/O."""
        overrides = request.overrides
        key = self._overrides_key(overrides) if overrides else b""
        prepared = self._prepared.get((request.pipeline, key))
        if prepared is None or prepared.run.reload:
            return None
        state = self._modules.get(request.pipeline)
        if state is None or state.generation != prepared.generation:
            return None
        if time.monotonic() - state.checked_at > self._check_interval:
            return None
        return prepared

    def prepare(self, pipeline: str, overrides: Mapping[str, object] | None = None) -> Prepared:
        """Load the module and build the driver for ``pipeline`` (cached; does blocking I/O)."""
        overrides = overrides or {}
        key = (pipeline, self._overrides_key(overrides))
        with self._lock:
            cfg = self._spec.pipeline(pipeline)
            run = self._effective_run(cfg.run, overrides)
            state = self._module_state(pipeline, run)
            prepared = self._prepared.get(key)
            if prepared is not None and prepared.generation == state.generation:
                return prepared
            prepared = self._build(pipeline, run, state)
            _bounded_put(self._prepared, key, prepared, self._max_prepared)
            return prepared

    def _effective_run(self, base: RunConfig, overrides: Mapping[str, object]) -> RunConfig:
        if not overrides:
            return base
        data = base.model_dump()
        for k, v in overrides.items():
            if k in _MERGED_OVERRIDES and isinstance(v, Mapping):
                data[k] = {**data.get(k, {}), **v}
            elif v is not None:
                data[k] = v
        try:
            return RunConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, RunConfig, "run overrides")) from None

    def _module_state(self, pipeline: str, run: RunConfig) -> _ModuleState:
        files = self._spec.files
        local_extra = [m for m in run.additional_modules if files.exists(files.module_rel(m))]
        rels = (files.module_rel(pipeline), *(files.module_rel(m) for m in local_extra))
        state = self._modules.get(pipeline)
        now = time.monotonic()
        if state is not None and not run.reload:
            if now - state.checked_at <= self._check_interval:
                return state
        try:
            signature = tuple(files.signature(r) for r in rels)
        except FileNotFoundError:
            # Deleted since the project was loaded: a failed run, not an exception escaping run().
            missing = [files.display(r) for r in rels if not files.exists(r)]
            raise PipelineImportError(
                f"pipeline {pipeline!r}: module file not found: {', '.join(missing)}"
            ) from None
        if state is not None and not run.reload and signature == state.signature:
            state.checked_at = now
            return state
        modules = [
            import_pipeline_module(files, rel, module_name_for(files, name), self._spec)
            for rel, name in zip(rels, (pipeline, *local_extra), strict=True)
        ]
        for name in run.additional_modules:
            if name in local_extra:
                continue
            try:
                modules.append(importlib.import_module(name))
            except ImportError as exc:
                raise PipelineImportError(
                    f"pipeline {pipeline!r}: run.additional_modules: cannot import {name!r}: {exc}"
                ) from None
        from . import _hamilton

        if state is not None:
            # Drivers of the previous generation are never used again: drop them, or a
            # pipeline with ``reload: true`` (or edited often) would keep every one it built.
            for stale in [k for k in self._drivers if k[0] == pipeline]:
                del self._drivers[stale]
        new = _ModuleState(
            modules=tuple(modules),
            files=tuple(files.display(r) for r in rels),
            signature=signature,
            generation=(state.generation + 1) if state else 1,
            checked_at=now,
            is_async=_hamilton.is_async_modules(modules),
        )
        self._modules[pipeline] = new
        return new

    def _build(self, pipeline: str, run: RunConfig, state: _ModuleState) -> Prepared:
        from . import _hamilton

        cfg = self._spec.pipeline(pipeline)
        dkey = orjson.dumps(
            [
                run.config,
                run.executor.model_dump(),
                run.with_adapter.model_dump(),
                run.cache.model_dump(),
            ],
            option=orjson.OPT_SORT_KEYS,
            default=repr,
        )
        cached = self._drivers.get((pipeline, state.generation, dkey))
        if cached is None:
            try:
                dr = _hamilton.build_driver(
                    pipeline=pipeline,
                    modules=state.modules,
                    config=run.config,
                    executor=run.executor,
                    with_adapter=run.with_adapter,
                    adapter_settings=cfg.adapter,
                    cache=run.cache,
                    cache_dir=f"{self._cache_dir}/{pipeline}",
                    is_async=state.is_async,
                )
            except FlowerPowerError:
                raise
            except Exception as exc:
                raise InputError(
                    f"pipeline {pipeline!r}: the Hamilton graph does not build: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            cached = (dr, _hamilton.DagInfo.of(dr))
            _bounded_put(
                self._drivers, (pipeline, state.generation, dkey), cached, self._max_prepared
            )
        dr, dag = cached
        return assemble(
            pipeline,
            run,
            cfg.params,
            dr,
            dag,
            is_async=state.is_async,
            modules=state.modules,
            module_files=state.files,
            generation=state.generation,
        )

    # ---------------------------------------------------------------- execution

    def _execute_sync(self, prepared: Prepared, inputs: dict[str, object]) -> Mapping[str, object]:
        """One sync execution: the driver's fast executor when it has one, else ``execute``."""
        dr = prepared.driver
        entry = self._fast.get(id(dr))
        if entry is None or entry[0] is not dr:
            from . import _hamilton

            entry = (dr, _hamilton.fast_executor(dr))
            _bounded_put(self._fast, id(dr), entry, self._max_prepared)
        fast = entry[1]
        if fast is not None:
            out = fast(prepared.final_vars, inputs)
            if out is not None:
                return out
        return as_mapping(dr.execute(list(prepared.final_vars), inputs=inputs))

    async def run(self, request: RunRequest) -> RunResult:
        """Execute ``request`` with retries and per-attempt timeout; never raises for run errors."""
        bind(request)  # the tracking adapters' tags and run names (tracking.py)
        try:
            prepared = self.cached(request)
            if prepared is None:
                prepared = await anyio.to_thread.run_sync(
                    self.prepare, request.pipeline, request.overrides
                )
            if prepared.is_async and not prepared.ready[0]:
                from . import _hamilton

                await _hamilton.init_async_driver(prepared.driver)
                prepared.ready[0] = True
        except FlowerPowerError as exc:
            return failed_before_start(request, exc)
        inputs = prepared.inputs_for(request)
        bad = prepared.input_error(request, inputs)
        attempts: Attempts | None = None  # made at the first failure: most runs need none
        timeout = prepared.run.timeout
        while True:
            started = utcnow()
            try:
                if bad is not None:
                    raise bad  # an attempt that fails at once, without retries
                if timeout is None:
                    # No cancel scope when there is nothing to time out: one less per run.
                    out = await self._attempt(prepared, inputs)
                else:
                    with anyio.move_on_after(timeout) as scope:
                        out = await self._attempt(prepared, inputs)
                    if scope.cancelled_caught:
                        number = 1 if attempts is None else attempts.number
                        raise RunTimeoutError(
                            f"pipeline {request.pipeline!r}: attempt {number} "
                            f"exceeded its timeout of {timeout:g} s"
                        )
            except Exception as exc:
                if attempts is None:
                    attempts = Attempts(request, prepared, self._rng)
                delay = attempts.failed(exc, started)
                if delay is None:
                    result = attempts.result()
                    break
                await anyio.sleep(delay)
            else:
                if attempts is None:
                    result = first_try_result(request, out, started)
                else:
                    attempts.succeeded(out, started)
                    result = attempts.result()
                break
        await self._acallback(prepared, result)
        return result

    async def _attempt(self, prepared: Prepared, inputs: dict[str, object]) -> Mapping[str, object]:
        """One execution: async pipelines on the loop, sync ones in a worker thread."""
        if prepared.is_async:
            from . import _hamilton

            return as_mapping(
                await _hamilton.execute_async(prepared.driver, list(prepared.final_vars), inputs)
            )
        executor = self.executor
        if executor is not None:
            # The daemon's pool (threads.ElasticThreadPool): quick runs share one thread.
            # Cancelling abandons the thread's work, as ``abandon_on_cancel`` does.
            context = contextvars.copy_context()  # structlog's run_id etc. in the thread
            run_soon: _RunSoon | None = getattr(executor, "run_soon", None)
            if run_soon is not None:  # one thread hop, without concurrent.futures
                return await run_soon(context.run, self._execute_sync, prepared, inputs)
            return await asyncio.get_running_loop().run_in_executor(
                executor, context.run, self._execute_sync, prepared, inputs
            )
        return await anyio.to_thread.run_sync(
            self._execute_sync,
            prepared,
            inputs,
            abandon_on_cancel=True,
            limiter=self._thread_limiter(),
        )

    def run_sync(self, request: RunRequest) -> RunResult:
        """Blocking run for the CLI and the sync API; same semantics as :meth:`run`."""
        bind(request)
        try:
            prepared = self.cached(request) or self.prepare(request.pipeline, request.overrides)
        except FlowerPowerError as exc:
            return failed_before_start(request, exc)
        if prepared.is_async or prepared.run.timeout:
            return anyio.run(self.run, request)
        inputs = prepared.inputs_for(request)
        bad = prepared.input_error(request, inputs)
        attempts: Attempts | None = None  # made at the first failure: most runs need none
        while True:
            started = utcnow()
            try:
                if bad is not None:
                    raise bad
                out = self._execute_sync(prepared, inputs)
            except Exception as exc:
                if attempts is None:
                    attempts = Attempts(request, prepared, self._rng)
                delay = attempts.failed(exc, started)
                if delay is None:
                    result = attempts.result()
                    break
                time.sleep(delay)
            else:
                if attempts is None:
                    result = first_try_result(request, out, started)
                else:
                    attempts.succeeded(out, started)
                    result = attempts.result()
                break
        callback = prepared.on_success if result.ok else prepared.on_failure
        if callback is not None:
            _call_logged(callback, result)
        return result

    def _thread_limiter(self) -> anyio.CapacityLimiter | None:
        if self._max_threads is None:
            return None
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_threads)
        return self._limiter

    async def _acallback(self, prepared: Prepared, result: RunResult) -> None:
        callback = prepared.on_success if result.ok else prepared.on_failure
        if callback is None:
            return
        if inspect.iscoroutinefunction(callback):
            try:
                await callback(result)
            except Exception:
                log.exception("callback_failed", pipeline=result.pipeline, run_id=result.run_id)
        else:
            await anyio.to_thread.run_sync(_call_logged, callback, result)


def _bounded_put(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Insert, dropping the oldest entries beyond ``limit`` (insertion order)."""
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]


def _call_logged(callback: Callback, result: RunResult) -> None:
    """Call a callback from sync code; an ``async def`` one is run to completion here."""
    try:
        out = callback(result)
        if inspect.isawaitable(out):
            anyio.run(_awaited, out)
    except Exception:
        log.exception("callback_failed", pipeline=result.pipeline, run_id=result.run_id)


async def _awaited(awaitable: Awaitable[object]) -> None:
    await awaitable
