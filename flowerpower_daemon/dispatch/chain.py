"""The admission chain's vocabulary: an event under admission, a rejection, a stage.

An event goes through its trigger's stages in order (decode, config hook,
dedup, overlap, per-key: see the sibling modules). Each stage has one
signature, ``async (Admission) -> Rejection | None``: ``None`` lets the
event go on (the stage may have filled in or changed the admission: inputs,
overrides, dedup key, per-key key), a :class:`Rejection` stops it with the
reason. The stages hold only configuration; what a trigger keeps between
events (runs in flight, per-key slots, counters) is its
:class:`TriggerState`. The dispatcher, the chain's owner, builds the run
request once an event passed every stage, and turns a rejection into the
error result (bad input) or the log line and counter (a duplicate, a skip, a
coalesced message), releases the dedup key and acks, in one place.

Per event the chain costs one :class:`Admission` and one coroutine per
stage that the trigger's configuration asks for (a plain MQTT trigger has
one stage: decode); the run request is built once, at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio
import orjson

from ..mqtt.sinks import Reply, reply_target
from ..project.models import RunRequest
from ..settings import MqttSettings, Trigger
from ..sources.base import TriggerEvent
from ..topics import TopicPattern

__all__ = [
    "Admission",
    "KeySlot",
    "RejectKind",
    "Rejection",
    "Stage",
    "Stats",
    "Trigger",
    "TriggerState",
    "maybe",
    "reply_for",
    "take",
]

RejectKind = Literal["bad_input", "duplicate", "skipped", "coalesced"]


@dataclass
class Stats:
    """Daemon-wide counters (shown by ``flowerpowerctl status``)."""

    messages_in: int = 0
    events: int = 0
    runs_ok: int = 0
    runs_failed: int = 0
    bad_input: int = 0
    skipped: int = 0
    unmatched: int = 0
    duplicates: int = 0
    coalesced: int = 0
    in_flight: int = 0


@dataclass
class KeySlot:
    """One key of a keyed trigger (``key: "{device}"``): its limit, its waiter, its burst.

    Lives while a handler holds, waits for or debounces the key; so the map of
    keys is bounded by the dispatcher's pending-handler bound.
    """

    limiter: anyio.CapacityLimiter | None
    users: int = 0
    waiting: anyio.CancelScope | None = None
    debounced: Admission | None = None  # the burst's latest message, with its request
    request: RunRequest | None = None
    deadline: float = 0.0


@dataclass
class TriggerState:
    """One configured trigger, its admission chain and its run-time state."""

    cfg: Trigger
    chain: tuple[Stage, ...] = ()
    pattern: TopicPattern | None = None
    limiter: anyio.CapacityLimiter | None = None
    # run id -> its cancel scope (only ``overlap: replace`` cancels, so only it has one)
    running: dict[str, anyio.CancelScope | None] = field(default_factory=dict)
    keys: dict[str, KeySlot] = field(default_factory=dict)
    fired: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    paused: bool = False


@dataclass(slots=True)
class Admission:
    """One event on its way through the chain: what its run request will be made of.

    ``inputs`` starts as the trigger's ``inputs`` under what the source
    decoded (topic fields, file path); decode merges the payload over it.
    ``overrides`` is the trigger's ``run:`` mapping until a stage replaces it
    (never mutated: it is the trigger's own). ``dedup_key`` is set once the key
    is claimed (a rejection after that releases it); ``key`` is the per-key
    slot this event belongs to. ``required_inputs`` are inputs the pipeline
    must take although unknown ones are dropped (decode: a payload that is not
    a JSON object, as its ``payload_input``; see ``RunRequest.required_inputs``).
    """

    state: TriggerState
    event: TriggerEvent
    run_id: str
    inputs: dict[str, object]
    overrides: Mapping[str, object]
    reply_to: str | None = None
    dedup_key: str | None = None
    key: str | None = None
    required_inputs: tuple[str, ...] = ()
    _values: dict[str, object] | None = field(default=None, init=False, repr=False)

    def payload_value(self) -> object:
        """The payload as the hook and key templates see it: its JSON (or text, or bytes)."""
        payload = self.event.payload
        try:
            return orjson.loads(payload or b"")
        except orjson.JSONDecodeError:
            return self.inputs.get("payload", payload)

    def key_values(self) -> dict[str, object]:
        """What a ``dedup_key`` or ``key`` template can name: payload.*, topic fields,
        props.*, topic, trigger (worked out once per event)."""
        if self._values is None:
            meta = self.event.meta
            self._values = {
                **dict(meta.get("fields") or {}),
                "payload": self.payload_value(),
                "props": dict(meta.get("user_properties") or ()),
                "topic": meta.get("topic") or "",
                "trigger": self.state.cfg.name,
            }
        return self._values


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event is not run.

    ``bad_input`` becomes an error result (a ``PayloadError`` with ``reason``
    as its message) on the reply target and the error topic; ``duplicate``,
    ``skipped`` and ``coalesced`` are dropped without a result. Each is counted
    and acked; ``log`` names the log line (with ``detail``), if any.
    """

    kind: RejectKind
    reason: str = ""
    log: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)


def reply_for(
    cfg: Trigger,
    event: TriggerEvent,
    run_id: str,
    mqtt: MqttSettings,
    reply_to: str | None = None,
) -> Reply:
    """Where the result of ``event``'s run goes (see :func:`~..mqtt.sinks.reply_target`)."""
    meta = event.meta
    return reply_target(
        pipeline=cfg.pipeline,
        trigger=cfg.name,
        run_id=run_id,
        fields=meta.get("fields") or {},
        result_topic=cfg.result_topic or mqtt.result_topic,
        error_topic=cfg.error_topic or mqtt.error_topic,
        response_topic=meta.get("response_topic"),
        correlation_data=meta.get("correlation_data"),
        reply_to=reply_to,
        publish=cfg.publish,
    )


class Stage(Protocol):
    """One policy of the admission chain."""

    async def __call__(self, admission: Admission) -> Rejection | None:
        """``None`` to let the event go on (perhaps changed), else why it stops here."""
        ...


async def take(slots: anyio.CapacityLimiter | anyio.Semaphore) -> None:
    """Take a slot, without a trip through the event loop when one is free.

    anyio's ``acquire`` always yields to the loop first (a checkpoint): per run,
    with three limiters, that was three loop iterations for nothing.
    ``acquire_nowait`` refuses while others wait, so the order stays fair.
    """
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        await slots.acquire()


class maybe:
    """``async with`` a limiter when there is one."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter

    async def __aenter__(self) -> None:
        if self.limiter is not None:
            await take(self.limiter)

    async def __aexit__(self, *exc: object) -> None:
        if self.limiter is not None:
            self.limiter.release()
