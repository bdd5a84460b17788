"""OpenTelemetry traces of runs: trigger -> queue wait -> run -> Hamilton's node spans.

Tracing is off unless :func:`configure` finds ``OTEL_TRACES_EXPORTER`` set to
an exporter (not ``none``) at process start (``flowerpower-daemon run`` and
``worker`` call it). Off, every hook here is one test of a module global and
returns at once; nothing of OpenTelemetry is imported. On, one trace per run:

- ``trigger <name>``: the event, from its arrival to its run request being
  admitted; child of the ``traceparent`` a device sent (an MQTT v5 user
  property, or a ``traceparent`` field of a JSON payload), else a root;
- ``queue <pipeline>``: from admission to the run's start (concurrency
  limits, the Redis stream, a debounce wait);
- ``run <pipeline>``: the run with its retries and the result's publishing;
  Hamilton's own ``OpenTelemetryTracer`` adds the graph and node spans under
  it. The result message carries this span's ``traceparent`` back as an
  MQTT v5 user property.

The context crosses the Redis queue in the run request itself
(``RunRequest.trace``: the trigger span's ``traceparent``/``tracestate`` and
the enqueue time), so a worker's spans join the daemon's trace.

The process-wide state here is like logging's: set once at start by the
entry point (or by a test through :func:`install`), read by the hooks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import DependencyMissingError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from ..project.adapters import OpenTelemetryConfig
    from ..project.models import RunRequest
    from .spans import RunSpan, Tracing

__all__ = [
    "EXTRA",
    "active",
    "configure",
    "hamilton_tracer",
    "install",
    "reply_properties",
    "requested_exporters",
    "start_run",
    "trigger",
    "uninstall",
]

EXTRA = "pip install 'flowerpower-daemon[otel]'"

_tracing: Tracing | None = None


def active() -> bool:
    """True when this process traces its runs."""
    return _tracing is not None


def requested_exporters(environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (empty: tracing off).

    ``none`` (alone or in the list) is none; ``OTEL_SDK_DISABLED=true`` turns
    everything off, as it does for the OpenTelemetry SDK.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def missing_extra(what: str, exc: ImportError) -> DependencyMissingError:
    """The one-line error for tracing asked for without the ``otel`` extra."""
    return DependencyMissingError(
        f"{what} needs OpenTelemetry, which is not installed ({exc.name or exc}); "
        f"install it with: {EXTRA}"
    )


def configure(
    service_name: str = "flowerpower-daemon", environ: Mapping[str, str] | None = None
) -> bool:
    """Switch tracing on from the ``OTEL_*`` environment variables; True if it is on.

    Also makes the provider OpenTelemetry's global one, so pipeline code that
    uses the OpenTelemetry API joins the run's trace. Raises
    :class:`DependencyMissingError` naming the extra when it is not installed,
    :class:`~flowerpower_daemon.errors.ConfigError` for an unknown exporter.
    """
    env = os.environ if environ is None else environ
    names = requested_exporters(env)
    if not names:
        return False
    try:
        from . import providers
    except ImportError as exc:
        raise missing_extra(f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']}", exc) from None
    provider = providers.provider_from_env(names, service_name, env)
    install(provider, make_global=True)
    return True


def install(provider: TracerProvider, *, make_global: bool = False) -> None:
    """Trace runs to ``provider`` (tests pass one with an in-memory exporter)."""
    global _tracing
    from .spans import Tracing

    _tracing = Tracing(provider)
    if make_global:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)


def uninstall() -> None:
    """Tracing off again (for tests); the provider is not shut down."""
    global _tracing
    _tracing = None


def trigger(
    request: RunRequest,
    user_properties: Sequence[tuple[str, str]] | None = None,
    *,
    since_queued: bool = True,
) -> dict[str, str] | None:
    """Record the trigger span of an admitted request; the carrier for ``RunRequest.trace``.

    The span starts at ``request.queued_at`` (the event's arrival; now, for
    ``since_queued=False``: a manual run, maybe delayed since it was asked
    for) and ends now; its parent is a ``traceparent`` in ``user_properties``
    (MQTT v5) or a ``traceparent`` input (a JSON payload's field). ``None``
    when off.
    """
    if _tracing is None:
        return None
    return _tracing.trigger(request, user_properties, since_queued)


def start_run(request: RunRequest) -> RunSpan | None:
    """Record the queue wait and open the run span (current until ``close()``); None when off."""
    if _tracing is None:
        return None
    return _tracing.start_run(request)


def reply_properties() -> tuple[tuple[str, str], ...]:
    """``(("traceparent", …),)`` of the current span for a result message; ``()`` when off."""
    if _tracing is None:
        return ()
    from .spans import current_traceparent

    traceparent = current_traceparent()
    return () if traceparent is None else (("traceparent", traceparent),)


def hamilton_tracer(
    settings: OpenTelemetryConfig, pipeline: str, *, endpoint: bool
) -> Tracer | None:
    """The tracer for Hamilton's ``OpenTelemetryTracer`` on ``pipeline``.

    ``endpoint`` (the pipeline's ``with_adapter.opentelemetry``): one that
    exports over OTLP to ``adapter.opentelemetry``'s host and port, as
    FlowerPower does. Otherwise the run tracer's provider (``None`` when off).
    The scope is named ``tracer_name``, else the pipeline.
    """
    name = settings.tracer_name or pipeline
    if endpoint:
        try:
            from . import providers
        except ImportError as exc:
            raise missing_extra("with_adapter.opentelemetry", exc) from None
        return providers.endpoint_tracer(settings.host, settings.port, name)
    if _tracing is None:
        return None
    return _tracing.provider.get_tracer(name)
