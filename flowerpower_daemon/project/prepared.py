"""A run of one pipeline with one set of overrides, prepared once: driver, inputs, checks.

:class:`Prepared` is what :class:`~.runner.PipelineRunner` keeps per
(pipeline, overrides) and what every run reads: the built driver, the final
vars, the inputs from ``params`` and ``run.inputs``, the deep type check of
each typed input, the retry backoff and the callbacks. It also answers
whether a request's inputs can run at all (:meth:`Prepared.input_error`),
before any node does. :func:`assemble` builds one from a driver.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import InputError
from ..retry import Backoff
from .config import RunConfig
from .inputtypes import Check
from .models import RunRequest, RunResult
from .modules import import_callable

if TYPE_CHECKING:
    from ._hamilton import DagInfo, Driver

__all__ = ["Callback", "Prepared", "assemble"]

#: ``run.on_success`` / ``run.on_failure``: called with the result (``async def`` allowed).
Callback = Callable[[RunResult], object]


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything a run of one pipeline with one set of overrides needs, built once."""

    pipeline: str
    run: RunConfig
    driver: Driver
    dag: DagInfo
    is_async: bool
    final_vars: tuple[str, ...]
    base_inputs: Mapping[str, object]
    module_files: frozenset[str]
    generation: int
    backoff: Backoff
    float_inputs: frozenset[str] = frozenset()
    #: What a request may name: the DAG's inputs, less Hamilton config keys.
    input_names: frozenset[str] = frozenset()
    #: input -> its deep type check (inputtypes.compile_check), for typed inputs only.
    input_checks: Mapping[str, Check] = field(default_factory=dict)
    on_success: Callback | None = None
    on_failure: Callback | None = None
    ready: list[bool] = field(default_factory=lambda: [False])

    def inputs_for(self, request: RunRequest) -> dict[str, object]:
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

    def input_error(self, request: RunRequest, inputs: Mapping[str, object]) -> InputError | None:
        """Why ``inputs`` (from :meth:`inputs_for`) cannot run, before any node does.

        A request input no node takes (unless the request ignores those, see
        :attr:`RunRequest.ignores_unknown_inputs`, and it is not one of its
        ``required_inputs``); a value that does not fit
        its input's annotation, checked all the way down; ``None`` where the
        type does not admit it (Hamilton would pass it on).
        """
        problems: list[str] = []
        given = request.inputs
        if given and not self.input_names.issuperset(given):
            if not request.ignores_unknown_inputs:
                unknown = [n for n in given if n not in self.input_names]
                problems.append(self.unknown_inputs_detail(unknown))
            elif request.required_inputs:
                problems += self._required_problems(request)
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

    def _required_problems(self, request: RunRequest) -> list[str]:
        """The request's ``required_inputs`` that no node takes, each a problem (see
        :attr:`RunRequest.required_inputs`: inputs kept even where unknown ones are dropped)."""
        known = ", ".join(sorted(self.input_names)) or "none"
        out = []
        for name in request.required_inputs:
            if name in self.input_names:
                continue
            if request.trigger.type == "mqtt":
                out.append(
                    f"the payload is not a JSON object, so it is the input {name!r} "
                    f"(the trigger's payload_input), which the pipeline does not take; "
                    f"its inputs: {known}"
                )
            else:
                out.append(f"no node takes the required input {name!r}; its inputs: {known}")
        return out

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


def assemble(
    pipeline: str,
    run: RunConfig,
    params: Mapping[str, object],
    driver: Driver,
    dag: DagInfo,
    *,
    is_async: bool,
    modules: Sequence[ModuleType],
    module_files: Iterable[str],
    generation: int,
) -> Prepared:
    """The :class:`Prepared` run of ``pipeline`` on a built driver (checks the final vars)."""
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
    base_inputs = {k: v for k, v in params.items() if k in dag.inputs}
    base_inputs.update(run.inputs)
    float_inputs = frozenset(n for n, t in dag.inputs.items() if t is float)
    for name in float_inputs.intersection(base_inputs):
        value = base_inputs[name]
        if type(value) is int:
            base_inputs[name] = float(value)
    if run.log_level:
        import logging

        for module in modules:
            logging.getLogger(module.__name__).setLevel(run.log_level)
    return Prepared(
        pipeline=pipeline,
        run=run,
        driver=driver,
        dag=dag,
        is_async=is_async,
        final_vars=tuple(final_vars),
        base_inputs=base_inputs,
        module_files=frozenset(module_files),
        generation=generation,
        float_inputs=float_inputs,
        input_names=dag.input_names,
        input_checks=dag.input_checks(),
        backoff=Backoff(run.retry_delay, run.retry_backoff, run.jitter_factor),
        on_success=_callback(pipeline, "on_success", run.on_success),
        on_failure=_callback(pipeline, "on_failure", run.on_failure),
    )


def _callback(pipeline: str, key: str, path: str | None) -> Callback | None:
    """The callable ``run.<key>`` names (``module:function`` or ``module.function``), if any."""
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
    return fn
