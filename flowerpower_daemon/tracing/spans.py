"""The spans of a run (imported only when tracing is on: it imports OpenTelemetry).

The trigger and queue spans are recorded after the fact, with explicit start
and end times: the trigger span once the event is admitted (its parent, a
payload's ``traceparent``, is known only after decoding), the queue span
when the run starts (possibly in a worker on another machine, from the
enqueue time the request carries). Only the run span is open while work
happens, as the current span, so that Hamilton's node spans, pipeline code
using the OpenTelemetry API and the result's ``traceparent`` hang under it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextvars import Token
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from ..version import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ..project.models import RunRequest, RunResult

__all__ = ["ENQUEUED", "RunSpan", "Tracing", "current_traceparent", "incoming_carrier"]

#: The key of ``RunRequest.trace`` holding the enqueue time (ns since the epoch).
ENQUEUED = "enqueued_ns"
_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


def incoming_carrier(
    user_properties: Sequence[tuple[str, str]] | None, inputs: Mapping[str, object]
) -> dict[str, str]:
    """The W3C trace context a device sent: MQTT v5 user properties win over JSON fields."""
    carrier: dict[str, str] = {}
    for key, value in user_properties or ():
        name = key.lower()
        if name in _HEADERS and isinstance(value, str):
            carrier[name] = value
    if "traceparent" not in carrier:
        for name in _HEADERS:
            field = inputs.get(name)
            if isinstance(field, str):
                carrier[name] = field
    return carrier


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span, or None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _ns(request: RunRequest) -> int:
    return int(request.queued_at.timestamp() * 1e9)


def _run_attributes(request: RunRequest) -> dict[str, AttributeValue]:
    return {"flowerpower.run_id": request.run_id, "flowerpower.pipeline": request.pipeline}


class RunSpan:
    """The open run span, current in this task until :meth:`close`."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: Token[Context]) -> None:
        self.span = span
        self.token = token

    def finish(self, result: RunResult) -> None:
        """Note the run's outcome on the span (status, attempts, error)."""
        span = self.span
        span.set_attribute("flowerpower.status", result.status)
        span.set_attribute("flowerpower.attempts", len(result.attempts))
        if result.worker:
            span.set_attribute("flowerpower.worker", result.worker)
        error = result.error
        if error is None:
            span.set_status(Status(StatusCode.OK))
        else:
            span.set_attribute("error.type", error.type)
            if error.node:
                span.set_attribute("flowerpower.error.node", error.node)
            span.set_status(Status(StatusCode.ERROR, f"{error.type}: {error.message}"[:500]))

    def close(self) -> None:
        """End the span and make the previous context current again."""
        otel_context.detach(self.token)
        self.span.end()


class Tracing:
    """The tracer of this process's runs."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("flowerpower_daemon", __version__)

    def trigger(
        self,
        request: RunRequest,
        user_properties: Sequence[tuple[str, str]] | None,
        since_queued: bool = True,
    ) -> dict[str, str]:
        """Record the trigger span (see :func:`flowerpower_daemon.tracing.trigger`)."""
        incoming = incoming_carrier(user_properties, request.inputs)
        parent = _PROPAGATOR.extract(incoming) if incoming else None
        info = request.trigger
        attributes: dict[str, AttributeValue] = {
            "flowerpower.trigger.name": info.name,
            "flowerpower.trigger.type": info.type,
            **_run_attributes(request),
        }
        kind = SpanKind.INTERNAL
        if info.topic is not None:
            kind = SpanKind.CONSUMER
            attributes["messaging.system"] = "mqtt"
            attributes["messaging.destination.name"] = info.topic
        if info.file_path is not None:
            attributes["file.path"] = info.file_path
        if info.scheduled is not None:
            attributes["flowerpower.scheduled"] = info.scheduled
            if info.catch_up:
                attributes["flowerpower.catch_up"] = True
        now = time.time_ns()
        span = self.tracer.start_span(
            f"trigger {info.name}",
            context=parent,
            kind=kind,
            attributes=attributes,
            start_time=min(_ns(request), now) if since_queued else now,
        )
        span.end(end_time=now)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        carrier[ENQUEUED] = str(now)
        return carrier

    def start_run(self, request: RunRequest) -> RunSpan:
        """Record the queue span (when the request carries a context) and open the run span."""
        carrier = request.trace
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        now = time.time_ns()
        enqueued = carrier.get(ENQUEUED) if carrier else None
        if enqueued is not None and enqueued.isdigit():
            start = min(int(enqueued), now)
            queue = self.tracer.start_span(
                f"queue {request.pipeline}",
                context=parent,
                attributes=_run_attributes(request),
                start_time=start,
            )
            queue.end(end_time=now)
        span = self.tracer.start_span(
            f"run {request.pipeline}",
            context=parent,
            attributes=_run_attributes(request),
            start_time=now,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return RunSpan(span, token)
