"""The instrumentation points: :class:`Metrics`, whose methods do nothing.

The daemon and the worker call these where things happen (a trigger fires,
a timer fires late, a run finishes, a result is published). Without
``http.listen`` (or ``worker --http``) they hold this base class: each call
is one empty method call, and nothing else is built. With it they hold
:class:`~.prom.PromMetrics`, which counts into prometheus-client. Counters
the daemon keeps anyway (messages in, acks pending, reconnects, ...) are not
counted twice: they are read when ``/metrics`` is scraped (:mod:`.values`).

No prometheus-client import here: this module is imported by every daemon.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..mqtt.link import MqttLink
    from ..mqtt.sinks import MqttResultSink
    from ..project.models import RunRequest, RunResult

__all__ = ["NO_METRICS", "Metrics"]


class Metrics:
    """Instrumentation that does nothing (metrics off)."""

    enabled = False

    def fired(self, trigger: str) -> None:
        """A trigger produced an event (an MQTT message matched it, a timer, a file)."""

    def timer_fired(self, trigger: str, lateness_s: float) -> None:
        """A timer fired ``lateness_s`` seconds after its scheduled time."""

    def run_finished(self, request: RunRequest, result: RunResult) -> None:
        """A run ended (any status), with its result."""

    def last_fire(self, trigger: str) -> datetime | None:
        """When ``trigger`` last fired in this process (None: not since start, or off)."""
        return None

    def result_sink(
        self, link: MqttLink, *, qos: int, max_bytes: int | None, result_store: str | None
    ) -> MqttResultSink:
        """The MQTT result sink; with metrics on, one that also counts error results by
        reason (a subclass: the dedup stages check for ``MqttResultSink``)."""
        from ..mqtt.sinks import MqttResultSink

        return MqttResultSink(link, qos=qos, max_bytes=max_bytes, result_store=result_store)


#: The shared do-nothing instance.
NO_METRICS = Metrics()
