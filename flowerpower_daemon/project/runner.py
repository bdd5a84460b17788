"""Build Hamilton drivers once, execute runs with retries, timeouts and callbacks.

One async entry point, :meth:`PipelineRunner.run`; :meth:`run_sync` is a
thin wrapper for the CLI and the sync API that executes in the calling
thread (no event loop, no thread hop) when the run needs neither a timeout
nor the async driver, and otherwise drives :meth:`run` with ``anyio.run``.
Both loops share :class:`_Attempts`, which owns every retry decision.

Per pipeline the runner keeps the imported modules (re-imported when their
files change, checked at most once per ``check_interval`` seconds) and one
driver per effective (config, executor, adapters, cache): a second run pays
for neither import nor graph building.
"""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import importlib
import inspect
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType, TracebackType
from typing import Any

import anyio
import anyio.to_thread
import orjson
import structlog
from pydantic import ValidationError

from ..errors import (
    ConfigError,
    FlowerPowerError,
    InputError,
    PipelineImportError,
    RunTimeoutError,
)
from ..retry import Backoff, exception_matches
from .config import RunConfig, format_validation_error
from .inputtypes import Check
from .models import AttemptInfo, ErrorInfo, RunRequest, RunResult, RunStatus, utcnow
from .modules import import_callable, import_pipeline_module, module_name_for
from .registry import ProjectSpec

__all__ = ["PipelineRunner", "Prepared"]

log = structlog.get_logger("flowerpower_daemon.runner")

_MERGED_OVERRIDES = ("config", "with_adapter")


@dataclass(slots=True)
class _ModuleState:
    modules: tuple[ModuleType, ...]
    files: tuple[str, ...]
    signature: tuple[Any, ...]
    generation: int
    checked_at: float
    is_async: bool


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything a run of one pipeline with one set of overrides needs, built once."""

    pipeline: str
    run: RunConfig
    driver: Any
    dag: Any
    is_async: bool
    final_vars: tuple[str, ...]
    base_inputs: Mapping[str, Any]
    module_files: frozenset[str]
    generation: int
    backoff: Backoff
    float_inputs: frozenset[str] = frozenset()
    #: What a request may name: the DAG's inputs, less Hamilton config keys.
    input_names: frozenset[str] = frozenset()
    #: input -> its deep type check (inputtypes.compile_check), for typed inputs only.
    input_checks: Mapping[str, Check] = field(default_factory=dict)
    on_success: Callable[..., Any] | None = None
    on_failure: Callable[..., Any] | None = None
    ready: list[bool] = field(default_factory=lambda: [False])

    def inputs_for(self, request: RunRequest) -> dict[str, Any]:
        """params < run.inputs < request inputs, key by key; JSON ints accepted for floats.

        A request input named like a Hamilton config key (a payload field the
        config hook also read, say) is dropped: Hamilton rejects the clash and
        the config decides.
        """
        inputs = {**self.base_inputs, **request.inputs}
        for name in self.float_inputs.intersection(request.inputs):
            value = inputs[name]
            if type(value) is int:
                inputs[name] = float(value)
        config_keys = self.dag.config_keys
        if config_keys:
            for name in config_keys.intersection(inputs):
                del inputs[name]
        return inputs

    def input_error(self, request: RunRequest, inputs: Mapping[str, Any]) -> InputError | None:
        """Why ``inputs`` (from :meth:`inputs_for`) cannot run, before any node does.

        A request input no node takes (unless the request ignores those, see
        :attr:`RunRequest.ignores_unknown_inputs`); a value that does not fit
        its input's annotation, checked all the way down; ``None`` where the
        type does not admit it (Hamilton would pass it on).
        """
        problems: list[str] = []
        given = request.inputs
        if given and not self.input_names.issuperset(given) and not request.ignores_unknown_inputs:
            unknown = [n for n in given if n not in self.input_names]
            problems.append(self.unknown_inputs_detail(unknown))
        checks = self.input_checks
        if checks:
            for name, value in inputs.items():
                check = checks.get(name)
                if check is not None:
                    why = check(value)
                    if why is not None:
                        problems.append(f"input {name!r} {why}")
        if not problems:
            return None
        return InputError(f"pipeline {self.pipeline!r}: {'; '.join(problems)}")

    def unknown_inputs_error(self, names: Iterable[str]) -> InputError | None:
        """An InputError for the ``names`` no node of the pipeline takes, if any."""
        unknown = [n for n in names if n not in self.input_names]
        if not unknown:
            return None
        return InputError(f"pipeline {self.pipeline!r}: {self.unknown_inputs_detail(unknown)}")

    def unknown_inputs_detail(self, unknown: Sequence[str]) -> str:
        """What is wrong with ``unknown``: "no node takes input 'x' (did you mean 'y'?); the
        pipeline's inputs: ...", a Hamilton config key named as such."""
        known = sorted(self.input_names)
        config_keys = self.dag.config_keys
        named = []
        for name in unknown:
            if name in config_keys:
                named.append(f"{name!r} (a Hamilton config key: set it in config)")
                continue
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            named.append(f"{name!r}{hint}")
        return (
            f"no node takes input{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
            f"the pipeline's inputs: {', '.join(known) or 'none'}"
        )


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
        self._drivers: dict[tuple[str, int, bytes], tuple[Any, Any]] = {}
        self._prepared: dict[tuple[str, bytes], Prepared] = {}
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

    # ---------------------------------------------------------------- preparation

    def _overrides_key(self, overrides: Mapping[str, Any]) -> bytes:
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

    def prepare(self, pipeline: str, overrides: Mapping[str, Any] | None = None) -> Prepared:
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

    def _effective_run(self, base: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
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
        final_vars = run.final_vars or dag.terminal
        unknown = [v for v in final_vars if v not in dag.nodes]
        if unknown:
            hints = {
                v: difflib.get_close_matches(v, sorted(dag.nodes), n=3, cutoff=0.5) for v in unknown
            }
            detail = "; ".join(
                f"{v!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                for v, h in hints.items()
            )
            raise InputError(f"pipeline {pipeline!r}: unknown final var(s) {detail}")
        base_inputs = {k: v for k, v in cfg.params.items() if k in dag.inputs}
        base_inputs.update(run.inputs)
        float_inputs = frozenset(n for n, t in dag.inputs.items() if t is float)
        for name in float_inputs.intersection(base_inputs):
            if type(base_inputs[name]) is int:
                base_inputs[name] = float(base_inputs[name])
        if run.log_level:
            import logging

            for module in state.modules:
                logging.getLogger(module.__name__).setLevel(run.log_level)
        return Prepared(
            pipeline=pipeline,
            run=run,
            driver=dr,
            dag=dag,
            is_async=state.is_async,
            final_vars=tuple(final_vars),
            base_inputs=base_inputs,
            module_files=frozenset(state.files),
            generation=state.generation,
            float_inputs=float_inputs,
            input_names=dag.input_names,
            input_checks=dag.input_checks(),
            backoff=Backoff(run.retry_delay, run.retry_backoff, run.jitter_factor),
            on_success=_callback(pipeline, "on_success", run.on_success),
            on_failure=_callback(pipeline, "on_failure", run.on_failure),
        )

    # ---------------------------------------------------------------- execution

    def _execute_sync(self, prepared: Prepared, inputs: dict[str, Any]) -> Mapping[str, Any]:
        out = prepared.driver.execute(list(prepared.final_vars), inputs=inputs)
        return _as_mapping(out)

    async def run(self, request: RunRequest) -> RunResult:
        """Execute ``request`` with retries and per-attempt timeout; never raises for run errors."""
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
            return _failed_before_start(request, exc)
        inputs = prepared.inputs_for(request)
        bad = prepared.input_error(request, inputs)
        attempts = _Attempts(request, prepared, self._rng)
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
                        raise RunTimeoutError(
                            f"pipeline {request.pipeline!r}: attempt {attempts.number} "
                            f"exceeded its timeout of {timeout:g} s"
                        )
            except Exception as exc:
                delay = attempts.failed(exc, started)
                if delay is None:
                    break
                await anyio.sleep(delay)
            else:
                attempts.succeeded(out, started)
                break
        result = attempts.result()
        await self._acallback(prepared, result)
        return result

    async def _attempt(self, prepared: Prepared, inputs: dict[str, Any]) -> Mapping[str, Any]:
        """One execution: async pipelines on the loop, sync ones in a worker thread."""
        if prepared.is_async:
            from . import _hamilton

            return _as_mapping(
                await _hamilton.execute_async(prepared.driver, list(prepared.final_vars), inputs)
            )
        if self.executor is not None:
            # The daemon's pool (threads.ElasticThreadPool): quick runs share one thread.
            # Cancelling abandons the thread's work, as ``abandon_on_cancel`` does.
            context = contextvars.copy_context()  # structlog's run_id etc. in the thread
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, context.run, self._execute_sync, prepared, inputs
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
        try:
            prepared = self.cached(request) or self.prepare(request.pipeline, request.overrides)
        except FlowerPowerError as exc:
            return _failed_before_start(request, exc)
        if prepared.is_async or prepared.run.timeout:
            return anyio.run(self.run, request)
        inputs = prepared.inputs_for(request)
        bad = prepared.input_error(request, inputs)
        execute = prepared.driver.execute
        attempts: _Attempts | None = None  # made at the first failure: most runs need none
        while True:
            started = utcnow()
            try:
                if bad is not None:
                    raise bad
                out = execute(list(prepared.final_vars), inputs=inputs)
                if type(out) is not dict:
                    out = _as_mapping(out)
            except Exception as exc:
                if attempts is None:
                    attempts = _Attempts(request, prepared, self._rng)
                delay = attempts.failed(exc, started)
                if delay is None:
                    result = attempts.result()
                    break
                time.sleep(delay)
            else:
                if attempts is None:
                    result = _first_try_result(request, out, started)
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


class _Attempts:
    """Records attempts and decides, from the retry policy, whether and when to retry."""

    __slots__ = ("exception", "log", "outputs", "prepared", "request", "rng")

    def __init__(self, request: RunRequest, prepared: Prepared, rng: random.Random) -> None:
        self.request = request
        self.prepared = prepared
        self.rng = rng
        self.log: list[AttemptInfo] = []
        self.outputs: Mapping[str, Any] = {}
        self.exception: BaseException | None = None

    @property
    def number(self) -> int:
        return len(self.log) + 1

    def succeeded(self, outputs: Mapping[str, Any], started: datetime) -> None:
        self.outputs = outputs
        self.log.append(AttemptInfo(len(self.log) + 1, started, utcnow(), "success"))

    def failed(self, exc: Exception, started: datetime) -> float | None:
        """Record a failed attempt; the delay before the next one, or None to give up."""
        exc, error = self._classify(exc)
        status: RunStatus = "timeout" if isinstance(exc, RunTimeoutError) else "failed"
        number = self.number
        self.log.append(AttemptInfo(number, started, utcnow(), status, error))
        self.exception = exc
        run = self.prepared.run
        if not error.retryable or number > run.max_retries:
            return None
        if not exception_matches(exc, run.retry_exceptions):
            return None
        delay = self.prepared.backoff.delay(number, self.rng)
        log.warning(
            "attempt_failed",
            pipeline=self.request.pipeline,
            run_id=self.request.run_id,
            attempt=number,
            error=error.message,
            retry_in_s=round(delay, 3),
        )
        return delay

    def _classify(self, exc: Exception) -> tuple[Exception, ErrorInfo]:
        from . import _hamilton

        if isinstance(exc, FlowerPowerError):
            retryable = not isinstance(exc, InputError | ConfigError | PipelineImportError)
            return exc, ErrorInfo(type(exc).__name__, str(exc), None, retryable)
        if _hamilton.is_input_validation_error(exc):
            err = InputError(self._input_message(exc))
            return err, ErrorInfo("InputError", str(err), None, retryable=False)
        files = self.prepared.module_files
        node = _failing_node(exc.__traceback__, files)
        text = _node_traceback(exc, files) if self.request.traceback else None
        return exc, ErrorInfo(type(exc).__name__, str(exc), node, True, text)

    def _input_message(self, exc: Exception) -> str:
        p = self.prepared
        inputs = p.inputs_for(self.request)
        parts = []
        with suppress(Exception):
            for name, needed_by in p.dag.missing_inputs(p.driver, p.final_vars, inputs).items():
                parts.append(f"missing required input {name!r} (needed by {', '.join(needed_by)})")
            for name, why in p.dag.type_mismatches(inputs).items():
                parts.append(f"input {name!r} {why}")
        detail = "; ".join(parts) or str(exc).replace("\n", " ")
        return f"pipeline {p.pipeline!r}: {detail}"

    def result(self) -> RunResult:
        log, request = self.log, self.request
        last = log[-1]
        status = last.status
        # Positional: this runs once per run, and keywords cost a measurable share of it.
        return RunResult(
            request.run_id,
            request.pipeline,
            status,
            self.outputs,
            last.error,
            tuple(log),
            request.queued_at,
            log[0].started_at,
            last.finished_at,
            request.trigger,
            self.exception if status != "success" else None,
        )


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Insert, dropping the oldest entries beyond ``limit`` (insertion order)."""
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]


def _first_try_result(
    request: RunRequest, outputs: Mapping[str, Any], started: datetime
) -> RunResult:
    """What :meth:`_Attempts.result` gives for a run that succeeded at once, built directly."""
    attempt = AttemptInfo(1, started, utcnow(), "success")
    return RunResult(
        request.run_id,
        request.pipeline,
        "success",
        outputs,
        None,
        (attempt,),
        request.queued_at,
        started,
        attempt.finished_at,
        request.trigger,
    )


def _failed_before_start(request: RunRequest, exc: FlowerPowerError) -> RunResult:
    error = ErrorInfo(type(exc).__name__, str(exc), None, retryable=False)
    return RunResult.not_run(request, "failed", error, exception=exc)


def _as_mapping(out: Any) -> Mapping[str, Any]:
    if type(out) is dict or isinstance(out, Mapping):
        return out
    to_dict = getattr(out, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return {"result": out}


def _failing_node(tb: TracebackType | None, files: frozenset[str]) -> str | None:
    node = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename in files and code.co_name != "<module>":
            node = code.co_name
        tb = tb.tb_next
    return node


def _node_traceback(exc: BaseException, files: frozenset[str]) -> str:
    """The traceback from the first frame in the pipeline's own modules (Hamilton's
    frames above it cut), or the whole traceback when no frame is there."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename not in files:
        tb = tb.tb_next
    return "".join(
        traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__)
    )


def _callback(pipeline: str, key: str, path: str | None) -> Callable[..., Any] | None:
    if not path:
        return None
    try:
        fn = import_callable(path)
    except ImportError as exc:
        raise InputError(
            f"pipeline {pipeline!r}: run.{key}: cannot import {path!r}: {exc}"
        ) from None
    if not callable(fn):
        raise InputError(f"pipeline {pipeline!r}: run.{key}: {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _call_logged(callback: Callable[..., Any], result: RunResult) -> None:
    """Call a callback from sync code; an ``async def`` one is run to completion here."""
    try:
        out = callback(result)
        if inspect.isawaitable(out):
            anyio.run(_awaited, out)
    except Exception:
        log.exception("callback_failed", pipeline=result.pipeline, run_id=result.run_id)


async def _awaited(awaitable: Awaitable[Any]) -> None:
    await awaitable
