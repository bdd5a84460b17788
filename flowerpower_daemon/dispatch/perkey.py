"""Policy ``key`` (MQTT triggers): per-source limits, coalescing and debouncing.

``key`` is a template (like ``dedup_key``) naming the source of a message,
e.g. ``"{device}"``. The admission stage :class:`PerKey` works it out (a
message lacking a field it names is bad input). Each key in use has a
:class:`~.chain.KeySlot`: ``max_concurrent_per_key`` is its limiter, and
with ``coalesce`` a newer message takes the place of the one waiting
(:func:`take_turn`). ``debounce`` holds a key's latest message until no newer
one came for that long; the dispatcher keeps that burst in the slot.
"""

from __future__ import annotations

import anyio

from ..settings import MqttTrigger
from ..state.dedup import render_key
from .chain import Admission, KeySlot, Rejection, TriggerState, take

__all__ = ["PerKey", "release_slot", "slot_for", "take_turn"]


class PerKey:
    """Work out which key an event belongs to."""

    __slots__ = ("template",)

    def __init__(self, template: str) -> None:
        self.template = template

    async def __call__(self, admission: Admission) -> Rejection | None:
        try:
            admission.key = render_key(self.template, admission.key_values())
        except KeyError as exc:
            return Rejection("bad_input", f"key: {exc.args[0]}")
        return None


def slot_for(state: TriggerState, cfg: MqttTrigger, key: str) -> KeySlot:
    """The slot of ``key``, made on first use."""
    slot = state.keys.get(key)
    if slot is None:
        limit = cfg.max_concurrent_per_key or (1 if cfg.coalesce else None)
        slot = state.keys[key] = KeySlot(anyio.CapacityLimiter(limit) if limit else None)
    return slot


def release_slot(state: TriggerState, key: str, slot: KeySlot) -> None:
    """One user less; the last one (with no burst held) forgets the slot."""
    slot.users -= 1
    if slot.users == 0 and slot.debounced is None and state.keys.get(key) is slot:
        del state.keys[key]


async def take_turn(slot: KeySlot, coalesce: bool) -> bool:
    """Wait for the key's run limit; False when a newer message took this one's place."""
    assert slot.limiter is not None
    if coalesce and slot.waiting is not None:
        slot.waiting.cancel()  # the older waiter gives way to this newer message
    held = False
    with anyio.CancelScope() as waiting:
        slot.waiting = waiting
        await take(slot.limiter)
        held = True
    if slot.waiting is waiting:
        slot.waiting = None
    return held
