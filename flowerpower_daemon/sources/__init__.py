"""Trigger sources: each is an async iterator of frozen :class:`TriggerEvent` objects."""

from .base import TriggerEvent
from .files import file_events
from .timers import TimerSpec, next_fire, timer_events

__all__ = ["TimerSpec", "TriggerEvent", "file_events", "next_fire", "timer_events"]
