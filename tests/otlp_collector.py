"""Tiny OTLP trace collectors for tests: real exporters send them real protobuf.

``async with otlp_collector() as c:`` listens on loopback in the test's event
loop (no thread); ``c.endpoint`` is the base URL for
``OTEL_EXPORTER_OTLP_ENDPOINT`` (with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``),
``c.spans`` what arrived, and ``await c.wait_for(predicate)`` waits (bounded)
until the spans satisfy ``predicate``. ``otlp_grpc_collector()`` is the same
over OTLP/gRPC (``c.port`` for an exporter's ``host:port``).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class Span:
    """One received span: ids as hex, attributes as plain values, its service's name."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    service: str
    status_code: int
    start_ns: int
    end_ns: int


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Collector:
    port: int = 0
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that should export its traces here, quickly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            **extra,
        }

    def _add(self, body: bytes) -> None:
        self.add(ExportTraceServiceRequest.FromString(body))

    def add(self, request: ExportTraceServiceRequest) -> None:
        """Keep the spans of one export request."""
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            service=service,
                            status_code=s.status.code,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        self.requests += 1
        self._changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                status = "200 OK"
                reply = ExportTraceServiceResponse().SerializeToString()
                if lines[0].startswith("POST /v1/traces "):
                    self._add(body)
                else:
                    status, reply = "404 Not Found", b""
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(
        self, predicate: Callable[[list[Span]], bool], timeout: float = 30
    ) -> list[Span]:
        """The spans once ``predicate(spans)`` holds; fails after ``timeout`` s listing them."""
        try:
            with anyio.fail_after(timeout):
                while not predicate(self.spans):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = [(s.service, s.name, s.trace_id[:8]) for s in self.spans]
            raise AssertionError(f"spans not as expected in {timeout} s; got {seen}") from None
        return self.spans


@asynccontextmanager
async def otlp_collector() -> AsyncIterator[Collector]:
    collector = Collector()
    server = await asyncio.start_server(collector._serve, "127.0.0.1", 0)
    collector.port = server.sockets[0].getsockname()[1]
    try:
        yield collector
    finally:
        server.close()


@asynccontextmanager
async def otlp_grpc_collector() -> AsyncIterator[Collector]:
    """A collector over OTLP/gRPC (grpc.aio, in this event loop)."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    collector = Collector()

    class _Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        async def Export(  # gRPC's method name
            self, request: ExportTraceServiceRequest, context: object
        ) -> ExportTraceServiceResponse:
            collector.add(request)
            return ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(), server)
    collector.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector
    finally:
        await server.stop(None)
