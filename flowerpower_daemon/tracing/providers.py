"""Tracer providers and exporters from the standard ``OTEL_*`` variables (imports the SDK).

A small equivalent of the SDK's auto-configuration, for traces only:

- ``OTEL_TRACES_EXPORTER``: a comma-separated list; ``otlp`` is OTLP over
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``
  (``grpc``, the Python SDK's default, or ``http/protobuf``); any other name
  is an installed ``opentelemetry_traces_exporter`` entry point (``console``,
  ``otlp_proto_http``, ``zipkin_json`` ...);
- the exporters read their own variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``_HEADERS``, ``_TIMEOUT``, ``_CERTIFICATE`` ...), the provider its sampler
  (``OTEL_TRACES_SAMPLER``), the batch processor ``OTEL_BSP_*``;
- the resource: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, with
  ``service.name`` defaulting to ``flowerpower-daemon``.

:func:`endpoint_tracer` serves the FlowerPower adapter setting
``adapter.opentelemetry: {host, port}``: one provider with an OTLP exporter
per endpoint, kept for the process (each has its export thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Tracer

from ..errors import ConfigError, ConfigProblem
from ..version import __version__

__all__ = ["endpoint_tracer", "otlp_protocol", "provider_from_env"]

_GROUP = "opentelemetry_traces_exporter"
_OTLP = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def _problem(key: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem("environment", key, message)])


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol for traces: ``grpc`` unless the environment says ``http/protobuf``."""
    for key in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(key, "").strip()
        if value:
            if value not in _OTLP:
                raise _problem(key, f"{value!r} is not supported (use grpc or http/protobuf)")
            return value
    return "grpc"


def _resource(service_name: str) -> Resource:
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    entry = _OTLP[otlp_protocol(environ)] if name == "otlp" else name
    found = entry_points(group=_GROUP, name=entry)
    if not found:
        known = sorted({"otlp", *(ep.name for ep in entry_points(group=_GROUP))})
        raise _problem(
            "OTEL_TRACES_EXPORTER",
            f"no span exporter {name!r} is installed (known here: {', '.join(known)})",
        )
    cls = next(iter(found)).load()
    exporter: SpanExporter = cls()
    return exporter


def provider_from_env(
    names: Sequence[str], service_name: str, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A provider exporting through each exporter ``names`` lists (batched)."""
    env = os.environ if environ is None else environ
    provider = TracerProvider(resource=_resource(service_name))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


_endpoints: dict[tuple[str, int], TracerProvider] = {}
_endpoints_lock = threading.Lock()


def _otlp_to(host: str, port: int, environ: Mapping[str, str]) -> SpanExporter:
    exporter: SpanExporter
    if otlp_protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=f"http://{host}:{port}", insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=f"http://{host}:{port}/v1/traces")
    return exporter


def endpoint_tracer(host: str, port: int, name: str) -> Tracer:
    """A tracer exporting over OTLP to ``host:port`` (one provider per endpoint)."""
    with _endpoints_lock:
        provider = _endpoints.get((host, port))
        if provider is None:
            provider = TracerProvider(resource=_resource("flowerpower-daemon"))
            provider.add_span_processor(BatchSpanProcessor(_otlp_to(host, port, os.environ)))
            _endpoints[(host, port)] = provider
    return provider.get_tracer(name, __version__)
