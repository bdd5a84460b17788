"""Trigger events -> run requests, and the policies around them.

Inputs are merged key by key, lowest to highest: the pipeline's ``params``
and ``run.inputs`` (applied by the runner), the trigger's ``inputs``, what
the source decoded (topic fields, file path), then the payload. Policies:
global ``max_concurrent_runs``, per-trigger ``max_concurrent`` and
``overlap`` (allow / skip / queue / replace), all enforced by waiting, never
by an unbounded buffer. A bad payload becomes an error result on the error
topic; the message is acked (redelivering it would fail the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import orjson
import structlog
from anyio.abc import TaskGroup

from ..errors import FlowerPowerError
from ..mqtt.sinks import MqttResultSink, ResultSink, reply_target
from ..project.hooks import ConfigHook
from ..project.models import (
    ErrorInfo,
    RunRequest,
    RunResult,
    TriggerInfo,
    new_run_id,
)
from ..retry import Backoff
from ..settings import MqttTrigger, Settings
from ..sources.base import TriggerEvent
from ..sources.mqtt import PayloadError, TopicPattern, compile_topic, decode_payload
from ..state.dedup import DedupStore, render_key

__all__ = ["Dispatcher", "Stats", "TriggerState"]

log = structlog.get_logger("flowerpower_daemon.dispatch")
# Enqueue retries (queue on Redis): 0.2 s doubling to at most 10 s, +-50 %.
_ENQUEUE_BACKOFF = Backoff(0.2, 2.0, 0.5, 10.0)

Kiq = Callable[[RunRequest], Awaitable[Any]]


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
class _KeySlot:
    """One key of a keyed trigger (``key: "{device}"``): its limit, its waiter, its burst.

    Lives while a handler holds, waits for or debounces the key; so the map of
    keys is bounded by the dispatcher's pending-handler bound.
    """

    limiter: anyio.CapacityLimiter | None
    users: int = 0
    waiting: anyio.CancelScope | None = None
    debounced: tuple[TriggerEvent, RunRequest] | None = None
    deadline: float = 0.0


@dataclass
class TriggerState:
    """One configured trigger and its run-time state."""

    cfg: Any
    pattern: TopicPattern | None = None
    limiter: anyio.CapacityLimiter | None = None
    # run id -> its cancel scope (only ``overlap: replace`` cancels, so only it has one)
    running: dict[str, anyio.CancelScope | None] = field(default_factory=dict)
    keys: dict[str, _KeySlot] = field(default_factory=dict)
    fired: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    paused: bool = False


class Dispatcher:
    """Turns events into requests, applies policies, enqueues through ``kiq``."""

    def __init__(
        self,
        settings: Settings,
        triggers: list[Any],
        *,
        kiq: Kiq,
        sink: ResultSink,
        remote: bool,
        stats: Stats | None = None,
        config_hooks: Mapping[str, ConfigHook] | None = None,
        dedup: DedupStore | None = None,
    ) -> None:
        self.settings = settings
        self.config_hooks = dict(config_hooks or {})
        self.dedup = dedup
        self.kiq = kiq
        self.sink = sink
        self.remote = remote
        self.stats = stats or Stats()
        self.triggers: dict[str, TriggerState] = {}
        for cfg in triggers:
            self.add_trigger(cfg)
        self._global = anyio.CapacityLimiter(settings.max_concurrent_runs)
        # Bounds the handlers that wait for a slot: beyond it, sources wait (backpressure).
        self._pending = anyio.Semaphore(settings.max_concurrent_runs * 4)

    def add_trigger(self, cfg: Any) -> TriggerState:
        """Register (or replace) a trigger; its source is the caller's business."""
        state = TriggerState(cfg)
        if isinstance(cfg, MqttTrigger):
            state.pattern = compile_topic(cfg.topic)
        limit = 1 if cfg.overlap == "queue" else cfg.max_concurrent
        if limit:
            state.limiter = anyio.CapacityLimiter(limit)
        self.triggers[cfg.name] = state
        return state

    def remove_trigger(self, name: str) -> TriggerState | None:
        """Forget a trigger; its runs in flight go on and are still counted daemon-wide."""
        return self.triggers.pop(name, None)

    async def run_request(self, request: RunRequest) -> None:
        """Run a request no trigger produced (a manual run): global limit, then ``kiq``."""
        if self.remote:
            await self.kiq(request)
            return
        async with _maybe(self._global):
            self.stats.in_flight += 1
            try:
                await self.kiq(request)
            finally:
                self.stats.in_flight -= 1

    def mqtt_matches(self, topic: str) -> list[tuple[TriggerState, dict[str, str]]]:
        out = []
        for state in self.triggers.values():
            if state.pattern is not None and state.cfg.enabled:
                fields = state.pattern.match(topic)
                if fields is not None:
                    out.append((state, fields))
        return out

    def build_request(self, state: TriggerState, event: TriggerEvent) -> RunRequest:
        """The run request for ``event`` (raises PayloadError for a bad payload)."""
        cfg = state.cfg
        inputs: dict[str, Any] = {**cfg.inputs, **event.inputs}
        reply_to = None
        if isinstance(cfg, MqttTrigger) and event.payload is not None:
            decoded, reply_to = decode_payload(
                event.payload,
                cfg.payload,
                cfg.payload_input,
                max_bytes=self.settings.mqtt.max_payload_bytes,
                max_depth=self.settings.mqtt.max_payload_depth,
            )
            inputs.update(decoded)
        run_id = new_run_id()
        topic = event.meta.get("topic")
        fields = dict(event.meta.get("fields") or {})
        reply = self._reply(cfg, event, run_id, reply_to)
        return RunRequest(
            pipeline=cfg.pipeline,
            inputs=inputs,
            overrides=dict(cfg.run),
            run_id=run_id,
            trigger=TriggerInfo(
                name=cfg.name,
                type=event.kind,
                topic=topic,
                fields=fields,
                file_path=event.inputs.get("file_path"),
                scheduled=event.meta.get("scheduled"),
                catch_up=bool(event.meta.get("catch_up")),
            ),
            queued_at=event.at,
            reply=reply,
        )

    def _reply(
        self, cfg: Any, event: TriggerEvent, run_id: str, reply_to: str | None = None
    ) -> dict[str, Any]:
        """Where this event's result goes (see ``results.reply_target``)."""
        return reply_target(
            pipeline=cfg.pipeline,
            trigger=cfg.name,
            run_id=run_id,
            fields=dict(event.meta.get("fields") or {}),
            result_topic=cfg.result_topic or self.settings.mqtt.result_topic,
            error_topic=cfg.error_topic or self.settings.mqtt.error_topic,
            response_topic=event.meta.get("response_topic"),
            correlation_data=event.meta.get("correlation_data"),
            reply_to=reply_to,
            publish=cfg.publish,
        )

    async def submit(self, event: TriggerEvent, runs: TaskGroup) -> None:
        """Accept one event; returns once a handler owns it (may wait: backpressure)."""
        self.stats.events += 1
        state = self.triggers.get(event.trigger)
        if state is None or not state.cfg.enabled or state.paused:
            await _ack(event)
            return
        state.fired += 1
        try:
            request = self.build_request(state, event)
        except PayloadError as exc:
            self.stats.bad_input += 1
            log.warning(
                "bad_payload", trigger=state.cfg.name, topic=event.meta.get("topic"), error=str(exc)
            )
            await self._emit_error(state, event, exc)
            await _ack(event)
            return
        hook = self.config_hooks.get(state.cfg.pipeline) if state.pattern is not None else None
        if hook is not None:
            try:
                request = await self._apply_config_hook(hook, request, event)
            except Exception as exc:
                self.stats.bad_input += 1
                log.warning("config_hook_failed", trigger=state.cfg.name, error=str(exc))
                await self._emit_error(state, event, PayloadError(f"mqtt_build_config hook: {exc}"))
                await _ack(event)
                return
        if state.cfg.dedup_key and self.dedup is not None:
            try:
                key = render_key(state.cfg.dedup_key, _key_values(request, event))
            except KeyError as exc:
                self.stats.bad_input += 1
                await self._emit_error(state, event, PayloadError(str(exc.args[0])))
                await _ack(event)
                return
            key = f"{state.cfg.name}:{key}"
            claim, earlier = await self.dedup.claim(key, request.run_id, state.cfg.dedup_ttl)
            if claim != "new":
                self.stats.duplicates += 1
                log.info("duplicate_not_run", trigger=state.cfg.name, dedup_key=key, state=claim)
                if earlier is not None and isinstance(self.sink, MqttResultSink):
                    ok = orjson.loads(earlier).get("status") == "success"
                    await self.sink.publish_encoded(request.reply, earlier, ok=ok)
                await _ack(event)
                return
            request = dataclasses.replace(request, dedup_key=key)
        if state.cfg.overlap == "skip" and state.running:
            state.skipped += 1
            self.stats.skipped += 1
            log.info("run_skipped_overlap", trigger=state.cfg.name, running=list(state.running))
            await _ack(event)
            return
        slot_key = None
        if getattr(state.cfg, "key", None):
            try:
                slot_key = render_key(state.cfg.key, _key_values(request, event))
            except KeyError as exc:
                self.stats.bad_input += 1
                await self._emit_error(state, event, PayloadError(f"key: {exc.args[0]}"))
                await self._forget_key(request)
                await _ack(event)
                return
            if state.cfg.debounce:
                await self._debounce(state, slot_key, event, request, runs)
                return
        await _take(self._pending)
        if slot_key is not None:
            self._slot(state, slot_key).users += 1
        runs.start_soon(self._handle, state, event, request, slot_key, name=f"run:{request.run_id}")

    def _slot(self, state: TriggerState, key: str) -> _KeySlot:
        slot = state.keys.get(key)
        if slot is None:
            cfg = state.cfg
            limit = cfg.max_concurrent_per_key or (1 if cfg.coalesce else None)
            slot = state.keys[key] = _KeySlot(anyio.CapacityLimiter(limit) if limit else None)
        return slot

    def _release_slot(self, state: TriggerState, key: str, slot: _KeySlot) -> None:
        slot.users -= 1
        if slot.users == 0 and slot.debounced is None and state.keys.get(key) is slot:
            del state.keys[key]

    async def _coalesced(
        self, state: TriggerState, event: TriggerEvent, request: RunRequest
    ) -> None:
        """A message that a newer one on the same key stands for: not run, acked, counted."""
        state.skipped += 1
        self.stats.coalesced += 1
        log.info("run_coalesced", trigger=state.cfg.name, run_id=request.run_id)
        await self._forget_key(request)
        await _ack(event)

    async def _debounce(
        self,
        state: TriggerState,
        key: str,
        event: TriggerEvent,
        request: RunRequest,
        runs: TaskGroup,
    ) -> None:
        """Hold the key's latest message until ``debounce`` seconds pass without a newer one."""
        slot = state.keys.get(key)
        deadline = anyio.current_time() + state.cfg.debounce
        if slot is not None and slot.debounced is not None:
            older, older_request = slot.debounced
            slot.debounced, slot.deadline = (event, request), deadline
            await self._coalesced(state, older, older_request)
            return
        await _take(self._pending)
        slot = self._slot(state, key)
        slot.users += 1
        slot.debounced, slot.deadline = (event, request), deadline
        runs.start_soon(self._debounced, state, key, slot, name=f"debounce:{state.cfg.name}")

    async def _debounced(self, state: TriggerState, key: str, slot: _KeySlot) -> None:
        # Each newer message moves the deadline; sleep until it stops moving.
        while (delay := slot.deadline - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(delay)
        assert slot.debounced is not None
        (event, request), slot.debounced = slot.debounced, None
        await self._handle(state, event, request, key)

    async def _apply_config_hook(
        self, hook: ConfigHook, request: RunRequest, event: TriggerEvent
    ) -> RunRequest:
        """Merge the hook's dict into this request's Hamilton config (this message only)."""
        payload = request.inputs if event.payload is None else _payload_value(request, event)
        extra = await anyio.to_thread.run_sync(hook, payload, event.meta.get("topic") or "")
        if not isinstance(extra, Mapping):
            raise TypeError(f"must return a dict, not {type(extra).__name__}")
        overrides = dict(request.overrides)
        overrides["config"] = {**dict(overrides.get("config") or {}), **extra}
        return dataclasses.replace(request, overrides=overrides)

    async def _enqueue(self, request: RunRequest) -> None:
        """Hand ``request`` to the Redis queue, trying again until it is there.

        A failed enqueue (Redis restarting, say) is transient for a request we
        built ourselves; its MQTT message stays unacked meanwhile, and the
        broker would deliver it again only after a reconnect, so a failure is
        retried here, with capped backoff, until it works or the daemon stops.
        """
        failures = 0
        while True:
            try:
                await self.kiq(request)
                return
            except Exception as exc:
                failures += 1
                delay = _ENQUEUE_BACKOFF.delay(failures)
                log.warning(
                    "enqueue_failed",
                    run_id=request.run_id,
                    error=str(exc.__cause__ or exc),
                    attempt=failures,
                    retry_in_s=round(delay, 2),
                )
                await anyio.sleep(delay)

    async def _handle(
        self,
        state: TriggerState,
        event: TriggerEvent,
        request: RunRequest,
        key: str | None = None,
    ) -> None:
        slot = state.keys.get(key) if key is not None else None
        held = False
        try:
            if slot is not None and slot.limiter is not None and not self.remote:
                if state.cfg.coalesce and slot.waiting is not None:
                    slot.waiting.cancel()  # the older waiter gives way to this newer message
                with anyio.CancelScope() as waiting:
                    slot.waiting = waiting
                    await _take(slot.limiter)
                    held = True
                if slot.waiting is waiting:
                    slot.waiting = None
                if not held:
                    await self._coalesced(state, event, request)
                    return
            if self.remote:
                await self._enqueue(request)
                await _ack(event)
                return
            replace = state.cfg.overlap == "replace"
            if replace:
                for older in list(state.running.values()):
                    if older is not None:
                        older.cancel()
            async with _maybe(state.limiter), _maybe(self._global):
                self.stats.in_flight += 1
                try:
                    if replace:
                        with anyio.CancelScope() as scope:
                            state.running[request.run_id] = scope
                            await self.kiq(request)
                        replaced = scope.cancelled_caught
                    else:
                        state.running[request.run_id] = None
                        await self.kiq(request)
                        replaced = False
                    if replaced:
                        await self._forget_key(request)
                        await self.sink.emit(
                            request,
                            RunResult.not_run(
                                request,
                                "cancelled",
                                ErrorInfo(
                                    "Cancelled",
                                    "replaced by a newer run (overlap: replace)",
                                    None,
                                    False,
                                ),
                            ),
                        )
                finally:
                    state.running.pop(request.run_id, None)
                    self.stats.in_flight -= 1
            await _ack(event)
        except Exception:
            log.exception("dispatch_failed", trigger=state.cfg.name, run_id=request.run_id)
            if not self.remote:
                # The run itself ended (badly); an unacked message would hold a broker
                # in-flight slot until the next reconnect. With Redis the request may not be
                # in the stream: no ack, so the broker redelivers it.
                with anyio.CancelScope(shield=True):
                    try:
                        await self._forget_key(request)
                        await _ack(event)
                    except Exception:
                        # Whatever broke, one message must not take the daemon down.
                        log.exception("ack_failed", trigger=state.cfg.name, run_id=request.run_id)
        finally:
            self._pending.release()
            if slot is not None and key is not None:
                if held:
                    assert slot.limiter is not None
                    slot.limiter.release()
                self._release_slot(state, key, slot)

    async def _forget_key(self, request: RunRequest) -> None:
        """A run that never finished must not keep its dedup key: a redelivery runs again."""
        if request.dedup_key is not None and self.dedup is not None:
            await self.dedup.forget(request.dedup_key)

    def record(self, request: RunRequest, result: RunResult) -> None:
        """Count a finished run against its trigger and the daemon."""
        state = self.triggers.get(request.trigger.name)
        if result.ok:
            self.stats.runs_ok += 1
            if state:
                state.ok += 1
        else:
            self.stats.runs_failed += 1
            if state:
                state.failed += 1

    async def _emit_error(
        self, state: TriggerState, event: TriggerEvent, exc: FlowerPowerError
    ) -> None:
        cfg = state.cfg
        run_id = new_run_id()
        request = RunRequest(
            pipeline=cfg.pipeline,
            run_id=run_id,
            trigger=TriggerInfo(
                name=cfg.name,
                type=event.kind,
                topic=event.meta.get("topic"),
                fields=dict(event.meta.get("fields") or {}),
            ),
            queued_at=event.at,
            reply=self._reply(cfg, event, run_id),
        )
        error = ErrorInfo(type(exc).__name__, str(exc), None, False)
        self.stats.runs_failed += 1
        state.failed += 1
        await self.sink.emit(request, RunResult.not_run(request, "failed", error))


def _payload_value(request: RunRequest, event: TriggerEvent) -> Any:
    """What the hook sees as ``payload``: the decoded JSON (or text) of the message."""
    try:
        return orjson.loads(event.payload or b"")
    except orjson.JSONDecodeError:
        return request.inputs.get("payload", event.payload)


def _key_values(request: RunRequest, event: TriggerEvent) -> dict[str, Any]:
    """What a dedup_key template can name: payload.*, topic fields, props.*, topic."""
    return {
        **dict(event.meta.get("fields") or {}),
        "payload": _payload_value(request, event),
        "props": dict(event.meta.get("user_properties") or ()),
        "topic": event.meta.get("topic") or "",
        "trigger": request.trigger.name,
    }


async def _ack(event: TriggerEvent) -> None:
    if event.ack is not None:
        await event.ack()


async def _take(slots: anyio.CapacityLimiter | anyio.Semaphore) -> None:
    """Take a slot, without a trip through the event loop when one is free.

    anyio's ``acquire`` always yields to the loop first (a checkpoint): per run,
    with three limiters, that was three loop iterations for nothing.
    ``acquire_nowait`` refuses while others wait, so the order stays fair.
    """
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        await slots.acquire()


class _maybe:
    """``async with`` a limiter when there is one."""

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter

    async def __aenter__(self) -> None:
        if self.limiter is not None:
            await _take(self.limiter)

    async def __aexit__(self, *exc: object) -> None:
        if self.limiter is not None:
            self.limiter.release()
