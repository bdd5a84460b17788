"""What every trigger source yields: a frozen :class:`TriggerEvent`.

A source knows its transport and nothing about Hamilton. ``ack`` lets the
MQTT source acknowledge a message only once its run request is durably
enqueued or finished (at-least-once delivery); other sources leave it ``None``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypedDict

from ..project.models import utcnow

__all__ = ["EventMeta", "TriggerEvent", "TriggerKind"]

TriggerKind = Literal["mqtt", "cron", "interval", "date", "file", "manual"]


class EventMeta(TypedDict, total=False):
    """Transport details of an event; each source sets its own keys."""

    # MQTT
    topic: str
    fields: Mapping[str, str]  # the topic's named levels
    qos: int
    response_topic: str | None  # MQTT v5
    correlation_data: bytes | None  # MQTT v5
    user_properties: tuple[tuple[str, str], ...]  # MQTT v5
    # timers
    scheduled: str  # the fire time (ISO 8601, without jitter)
    scheduled_ts: float
    catch_up: bool  # a fire missed while the daemon was down
    # files
    path: str
    event: str


@dataclass(frozen=True, slots=True)
class TriggerEvent:
    """One firing of a trigger.

    ``payload`` is the raw payload (MQTT bytes; ``None`` for timers),
    ``inputs`` what the source already decoded into pipeline inputs (topic
    fields, file path and event), ``meta`` transport details (topic, qos,
    retain, MQTT v5 response topic and correlation data, scheduled time).
    """

    trigger: str
    kind: TriggerKind
    at: datetime = field(default_factory=utcnow)
    payload: bytes | None = None
    inputs: Mapping[str, object] = field(default_factory=dict)
    meta: EventMeta = field(default_factory=lambda: EventMeta())
    ack: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)
