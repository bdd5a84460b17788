"""Trigger sources: each is an async iterator of frozen :class:`TriggerEvent` objects."""

from .base import TriggerEvent

__all__ = ["TriggerEvent"]
