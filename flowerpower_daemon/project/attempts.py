"""The attempts of one run: retry decisions, error classification and the :class:`RunResult`.

:class:`Attempts` is shared by the runner's async and sync loops, so both
retry, classify errors (input errors are not retried; a node's failure names
the node and, when asked, its traceback) and build results the same way.
:func:`first_try_result` builds the result of a run that succeeded at once
without an :class:`Attempts` (most runs).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Mapping
from contextlib import suppress
from datetime import datetime
from types import TracebackType

import structlog

from ..errors import ConfigError, FlowerPowerError, InputError, PipelineImportError, RunTimeoutError
from ..retry import exception_matches
from .models import AttemptInfo, ErrorInfo, RunRequest, RunResult, RunStatus, utcnow
from .prepared import Prepared

__all__ = ["Attempts", "as_mapping", "failed_before_start", "first_try_result"]

log = structlog.get_logger("flowerpower_daemon.runner")


class Attempts:
    """Records attempts and decides, from the retry policy, whether and when to retry."""

    __slots__ = ("exception", "log", "outputs", "prepared", "request", "rng")

    def __init__(self, request: RunRequest, prepared: Prepared, rng: random.Random) -> None:
        self.request = request
        self.prepared = prepared
        self.rng = rng
        self.log: list[AttemptInfo] = []
        self.outputs: Mapping[str, object] = {}
        self.exception: BaseException | None = None

    @property
    def number(self) -> int:
        return len(self.log) + 1

    def succeeded(self, outputs: Mapping[str, object], started: datetime) -> None:
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


def first_try_result(
    request: RunRequest, outputs: Mapping[str, object], started: datetime
) -> RunResult:
    """What :meth:`Attempts.result` gives for a run that succeeded at once, built directly."""
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


def failed_before_start(request: RunRequest, exc: FlowerPowerError) -> RunResult:
    error = ErrorInfo(type(exc).__name__, str(exc), None, retryable=False)
    return RunResult.not_run(request, "failed", error, exception=exc)


def as_mapping(out: object) -> Mapping[str, object]:
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
