"""The listener's paths: ``/metrics``, ``/healthz``, ``/readyz`` and (daemon) ``/``.

``/healthz`` answers 200 whenever the event loop runs (it is the loop that
answers). ``/readyz`` answers 200 when the process can do its work, else 503
with the reason (MQTT disconnected, a timer not armed, starting, stopping).
``/metrics`` first refreshes what needs a round trip (the Redis queue's depth,
bounded to 2 s) and then renders the registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from ..control.api import DaemonControl
from .page import status_page
from .server import Handler, Response
from .values import QueueDepth, daemon_values, link_values

if TYPE_CHECKING:
    from ..mqtt.link import MqttLink
    from ..mqtt.sinks import MqttResultSink
    from ..queue.broker import RunExecutor
    from .prom import PromMetrics

__all__ = ["Endpoints", "daemon_endpoints", "worker_endpoints"]

log = structlog.get_logger("flowerpower_daemon.http")

_HTML = "text/html; charset=utf-8"


class Endpoints:
    """The handlers of one process (a daemon or a worker)."""

    def __init__(
        self,
        metrics: PromMetrics,
        *,
        not_ready: Callable[[], str | None],
        page: Callable[[], Awaitable[str]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.not_ready = not_ready
        self.page = page
        self.refresh = refresh

    def routes(self) -> dict[str, Handler]:
        routes: dict[str, Handler] = {
            "/metrics": self.scrape,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        if self.page is not None:
            routes["/"] = self.status
        return routes

    async def scrape(self) -> Response:
        from .prom import CONTENT_TYPE

        if self.refresh is not None:
            with anyio.move_on_after(2.0):
                await self.refresh()
        return Response(200, self.metrics.render(), CONTENT_TYPE)

    async def healthz(self) -> Response:
        return Response(200, b"ok\n")

    async def readyz(self) -> Response:
        reason = self.not_ready()
        if reason is None:
            return Response(200, b"ready\n")
        return Response(503, f"not ready: {reason}\n".encode())

    async def status(self) -> Response:
        assert self.page is not None
        return Response(200, (await self.page()).encode(), _HTML)


def daemon_endpoints(
    control: DaemonControl,
    metrics: PromMetrics,
    *,
    not_ready: Callable[[], str | None],
    dropped: Callable[[], int],
    depth: QueueDepth | None,
) -> Endpoints:
    """The daemon's endpoints: values from ``control.status()``, the status page."""
    latest: list[int | None] = [None]
    failing = [False]

    async def refresh() -> None:
        if depth is None:
            return
        try:
            latest[0] = await depth.read()
            failing[0] = False
        except Exception as exc:  # redis errors: no depth (rather than a stale one), say so once
            if not failing[0]:
                log.warning("queue_depth_failed", error=str(exc))
            failing[0] = True
            latest[0] = None

    metrics.read_at_scrape(
        lambda: daemon_values(
            control.status(), ready=not_ready() is None, dropped=dropped(), depth=latest[0]
        )
    )
    return Endpoints(
        metrics,
        not_ready=not_ready,
        page=lambda: status_page(control, metrics),
        refresh=refresh if depth is not None else None,
    )


def worker_endpoints(
    metrics: PromMetrics,
    *,
    link: MqttLink,
    sink: MqttResultSink,
    executor: RunExecutor,
    in_flight: Callable[[], int],
    not_ready: Callable[[], str | None],
) -> Endpoints:
    """A worker's endpoints: its MQTT link's and executor's values and the runs it has in
    flight (``in_flight``), no status page."""

    def read() -> dict[str, float]:
        return {
            **link_values(link, sink.results_out),
            "flowerpower_ready": float(not_ready() is None),
            "flowerpower_runs_in_flight": float(in_flight()),
            "flowerpower_runs_done": executor.done,
            "flowerpower_dedup_hits": executor.duplicates,
        }

    metrics.read_at_scrape(read)
    return Endpoints(metrics, not_ready=not_ready)
