"""Observability: Prometheus metrics, health and readiness, the status page.

``http.listen`` (daemon) or ``worker --http`` (worker) starts one small HTTP
listener (:mod:`.server`) in the process's task group: ``/metrics``,
``/healthz``, ``/readyz`` and, in the daemon, ``/`` (:mod:`.page`). The code
where things happen calls a :class:`~.metrics.Metrics` object; it does
nothing unless the listener is on (:func:`metrics_for`). prometheus-client
is the ``metrics`` extra, imported only when the listener is on.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigProblem
from .metrics import NO_METRICS, Metrics

__all__ = ["EXTRA_HINT", "NO_METRICS", "Metrics", "extra_problem", "metrics_for"]

#: What to install when the listener is enabled without prometheus-client.
EXTRA_HINT = "pip install 'flowerpower-daemon[metrics]'"


def extra_problem(key: str = "http.listen", file: str = "config") -> ConfigProblem | None:
    """The one-line problem when the listener is asked for but prometheus-client is missing."""
    if importlib.util.find_spec("prometheus_client") is not None:
        return None
    return ConfigProblem(file, key, f"needs the metrics extra: {EXTRA_HINT}")


def metrics_for(enabled: bool) -> Metrics:
    """The instrumentation: counting into prometheus-client when ``enabled``, else nothing."""
    if not enabled:
        return NO_METRICS
    from .prom import PromMetrics

    return PromMetrics()
