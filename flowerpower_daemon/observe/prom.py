"""Metrics on: :class:`PromMetrics` counts into a prometheus-client registry of its own.

Imported only when ``http.listen`` (or ``worker --http``) is set, so the
core install never imports prometheus-client. Each instrumentation call is
a dict lookup of the labelled child plus its ``inc``/``observe``; the
values the daemon counts anyway are read at scrape time (:class:`_Read`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from ..mqtt.sinks import MqttResultSink
from .metrics import Metrics
from .values import READ_METRICS

if TYPE_CHECKING:
    from ..mqtt.link import MqttLink
    from ..project.models import RunRequest, RunResult

__all__ = ["CONTENT_TYPE", "PromMetrics"]

#: The text exposition format every Prometheus 2.x reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_RUN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_LATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30)


class PromMetrics(Metrics):
    """Counters and histograms of runs, fires and error results, plus the values that
    ``read()`` returns at each scrape (see :data:`.values.READ_METRICS`)."""

    enabled = True

    def __init__(self) -> None:
        # No *_created series beside every counter and histogram (untyped in the library).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU, RSS, open fds of this process
        reg = self.registry
        self._runs = Counter(
            "flowerpower_runs",
            "Finished runs by pipeline, trigger and status",
            ["pipeline", "trigger", "status"],
            registry=reg,
        )
        self._duration = Histogram(
            "flowerpower_run_duration_seconds",
            "Run duration (start of the first attempt to the end of the last)",
            ["pipeline"],
            buckets=_RUN_BUCKETS,
            registry=reg,
        )
        self._latency = Histogram(
            "flowerpower_run_latency_seconds",
            "End-to-end latency: trigger event (message received, timer fired) to result",
            ["pipeline"],
            buckets=_RUN_BUCKETS,
            registry=reg,
        )
        self._retries = Counter(
            "flowerpower_run_retries", "Attempts beyond the first", ["pipeline"], registry=reg
        )
        self._errors = Counter(
            "flowerpower_error_results",
            "Error results published, by reason (error type: PayloadError, RunTimeoutError, ...)",
            ["reason"],
            registry=reg,
        )
        self._fires = Counter(
            "flowerpower_trigger_fires",
            "Events per trigger (matched MQTT messages, timer ticks, file changes)",
            ["trigger"],
            registry=reg,
        )
        self._lateness = Histogram(
            "flowerpower_timer_lateness_seconds",
            "How late a timer fired after its scheduled time (its _count: timer fires)",
            ["trigger"],
            buckets=_LATE_BUCKETS,
            registry=reg,
        )
        self._last: dict[str, float] = {}
        self._fire_children: dict[str, Counter] = {}
        self._run_children: dict[tuple[str, str, str], Counter] = {}

    def read_at_scrape(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Expose ``read()``'s values (names from :data:`.values.READ_METRICS`) at each scrape."""
        self.registry.register(_Read(read))

    # ------------------------------------------------------- instrumentation

    def fired(self, trigger: str) -> None:
        child = self._fire_children.get(trigger)
        if child is None:
            child = self._fire_children[trigger] = self._fires.labels(trigger)
        child.inc()
        self._last[trigger] = time.time()

    def timer_fired(self, trigger: str, lateness_s: float) -> None:
        self._lateness.labels(trigger).observe(max(0.0, lateness_s))

    def run_finished(self, request: RunRequest, result: RunResult) -> None:
        key = (result.pipeline, result.trigger.name, result.status)
        child = self._run_children.get(key)
        if child is None:
            child = self._run_children[key] = self._runs.labels(*key)
        child.inc()
        pipeline = result.pipeline
        self._duration.labels(pipeline).observe(result.duration_ms / 1000.0)
        latency = (result.finished_at - result.queued_at).total_seconds()
        self._latency.labels(pipeline).observe(max(0.0, latency))
        if len(result.attempts) > 1:
            self._retries.labels(pipeline).inc(len(result.attempts) - 1)

    def last_fire(self, trigger: str) -> datetime | None:
        ts = self._last.get(trigger)
        return datetime.fromtimestamp(ts, UTC) if ts is not None else None

    def error_result(self, reason: str) -> None:
        self._errors.labels(reason).inc()

    def result_sink(
        self, link: MqttLink, *, qos: int, max_bytes: int | None, result_store: str | None
    ) -> MqttResultSink:
        sink = _CountingSink(link, qos=qos, max_bytes=max_bytes, result_store=result_store)
        sink.metrics = self
        return sink

    # ------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (``/metrics``)."""
        return generate_latest(self.registry)


class _CountingSink(MqttResultSink):
    """The MQTT result sink that counts error results by reason first."""

    metrics: PromMetrics

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        if not result.ok:
            self.metrics.error_result(result.error.type if result.error else result.status)
        await super().emit(request, result)


class _Read:
    """A collector of the values the process counts anyway, read at each scrape."""

    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        values = self.read()
        for name, (kind, text) in READ_METRICS.items():
            value = values.get(name)
            if value is None:
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=value)
            else:
                yield GaugeMetricFamily(name, text, value=value)
