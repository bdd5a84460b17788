"""The values ``/metrics`` reads at scrape time from what the process counts anyway.

The daemon already keeps these for ``flowerpowerctl status`` (``DaemonControl.status``);
the worker keeps its MQTT link's and executor's. Reading them when Prometheus
asks costs the hot path nothing. :data:`READ_METRICS` names them once (the
README's table lists the same names); counters get ``_total`` appended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ..state.stores import RedisStore

if TYPE_CHECKING:
    from ..control.api import StatusInfo
    from ..mqtt.link import MqttLink
    from ..settings import QueueSettings

__all__ = ["READ_METRICS", "QueueDepth", "daemon_values", "link_values"]

Kind = Literal["counter", "gauge"]

#: name -> (kind, help). A process exposes the ones it has a value for.
READ_METRICS: dict[str, tuple[Kind, str]] = {
    "flowerpower_ready": ("gauge", "1 when /readyz would answer 200"),
    "flowerpower_messages_in": ("counter", "MQTT messages received on trigger topics"),
    "flowerpower_messages_unmatched": ("counter", "MQTT messages no trigger matched"),
    "flowerpower_events": ("counter", "Trigger events dispatched (all trigger kinds)"),
    "flowerpower_results_out": ("counter", "Result messages published"),
    "flowerpower_bad_input": ("counter", "Messages refused as bad input (an error result each)"),
    "flowerpower_dedup_hits": ("counter", "Duplicate messages (same dedup key) not run again"),
    "flowerpower_coalesced": ("counter", "Messages folded into a newer one (coalesce, debounce)"),
    "flowerpower_skipped": ("counter", "Events skipped by the overlap policy"),
    "flowerpower_runs_in_flight": ("gauge", "Runs executing now"),
    "flowerpower_runs_done": ("counter", "Runs this worker finished"),
    "flowerpower_acks_pending": ("gauge", "QoS 1/2 messages received and not acknowledged yet"),
    "flowerpower_intake_pauses": ("counter", "Times the intake bound stopped reading MQTT"),
    "flowerpower_mqtt_connected": ("gauge", "1 while the MQTT connection is up"),
    "flowerpower_mqtt_reconnects": ("counter", "MQTT connections after the first"),
    "flowerpower_mqtt_published": ("counter", "Messages published on MQTT"),
    "flowerpower_mqtt_outbox_size": ("gauge", "Results waiting in the outbox for the broker"),
    "flowerpower_mqtt_outbox_dropped": ("counter", "Results dropped: outbox full or unwritable"),
    "flowerpower_queue_depth": ("gauge", "Redis queue: runs enqueued and not acknowledged"),
    "flowerpower_workers": ("gauge", "Redis queue: live workers"),
}


def daemon_values(
    status: StatusInfo, *, ready: bool, dropped: int, depth: int | None
) -> dict[str, float]:
    """The daemon's values from its ``status`` answer."""
    c, m = status["counters"], status["mqtt"]
    out: dict[str, float] = {
        "flowerpower_ready": float(ready),
        "flowerpower_messages_in": c["messages_in"],
        "flowerpower_messages_unmatched": c["unmatched"],
        "flowerpower_events": c["events"],
        "flowerpower_results_out": c["results_out"],
        "flowerpower_bad_input": c["bad_input"],
        "flowerpower_dedup_hits": c["duplicates"],
        "flowerpower_coalesced": c["coalesced"],
        "flowerpower_skipped": c["skipped"],
        "flowerpower_runs_in_flight": status["in_flight"],
        "flowerpower_acks_pending": m["held"],
        "flowerpower_intake_pauses": m["intake_pauses"],
        "flowerpower_mqtt_connected": float(m["connected"]),
        "flowerpower_mqtt_reconnects": max(0, m["connects"] - 1),
        "flowerpower_mqtt_published": m["published"],
        "flowerpower_mqtt_outbox_size": m["outbox"],
        "flowerpower_mqtt_outbox_dropped": dropped,
    }
    if status["queue"]["backend"] == "redis":
        out["flowerpower_workers"] = len(status["workers"])
        if depth is not None:
            out["flowerpower_queue_depth"] = depth
    return out


def link_values(link: MqttLink, results_out: int) -> dict[str, float]:
    """A worker's MQTT values (its one connection publishes results)."""
    return {
        "flowerpower_results_out": results_out,
        "flowerpower_mqtt_connected": float(link.connected),
        "flowerpower_mqtt_reconnects": max(0, link.connects - 1),
        "flowerpower_mqtt_published": link.published,
        "flowerpower_mqtt_outbox_size": link.outbox_size,
        "flowerpower_mqtt_outbox_dropped": link.dropped_outbox,
    }


class QueueDepth(RedisStore):
    """The Redis stream's depth for the workers' group: entries not yet delivered
    (``lag``) plus delivered and not acknowledged (``pending``), one ``XINFO GROUPS``."""

    def __init__(self, queue: QueueSettings) -> None:
        self.url = queue.redis
        self.stream = queue.queue_name
        self.group = queue.consumer_group

    async def read(self) -> int | None:
        """The depth, or None before any worker created the group (raises Redis errors)."""
        groups = await self._redis.xinfo_groups(self.stream)
        for group in groups:
            info = {_text(k): v for k, v in group.items()}
            if _text(info.get("name", b"")) == self.group:
                lag = info.get("lag")
                return int(info.get("pending") or 0) + int(lag if lag is not None else 0)
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
