"""Trigger events -> run requests: the owner of the admission chain, and the runs it starts.

Inputs are merged key by key, lowest to highest: the pipeline's ``params``
and ``run.inputs`` (applied by the runner), the trigger's ``inputs``, what
the source decoded (topic fields, file path), then the payload. Each trigger
has a chain of stages (:mod:`.chain`), only those its configuration asks
for: decode and the config hook (MQTT), dedup, overlap skip, per-key. An
event that passes them becomes a run request; one that does not is
rejected here, in one place (:meth:`Dispatcher.reject`): a bad payload
becomes an error result on the error topic, and the message is acked
(redelivering it would fail the same way). Limits (global
``max_concurrent_runs``, per-trigger ``max_concurrent`` and ``overlap``,
per key) are enforced by waiting, never by an unbounded buffer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

import anyio
import structlog
from anyio.abc import TaskGroup

from .. import tracing
from ..mqtt.sinks import ResultSink
from ..project.hooks import ConfigHook
from ..project.models import ErrorInfo, RunRequest, RunResult, TriggerInfo, new_run_id
from ..retry import Backoff
from ..settings import MqttTrigger, Settings
from ..sources.base import TriggerEvent
from ..sources.mqtt import PayloadError
from ..state.dedup import DedupStore
from ..topics import compile_topic
from .carriers import Carriers
from .chain import (
    Admission,
    KeySlot,
    Rejection,
    Stage,
    Stats,
    Trigger,
    TriggerState,
    maybe,
    reply_for,
    take,
)
from .decode import Decode
from .dedup import Dedup
from .hook import ConfigHookStage
from .overlap import SKIP_WHILE_RUNNING, cancel_running, limiter_for, run_replaceable
from .perkey import PerKey, release_slot, slot_for, take_turn

__all__ = ["Dispatcher", "Stats", "TriggerState"]

log = structlog.get_logger("flowerpower_daemon.dispatch")
# Enqueue retries (queue on Redis): 0.2 s doubling to at most 10 s, +-50 %.
_ENQUEUE_BACKOFF = Backoff(0.2, 2.0, 0.5, 10.0)
_COALESCED = "run_coalesced"

Kiq = Callable[[RunRequest], Awaitable[object]]


class Dispatcher:
    """Turns events into requests through each trigger's chain, enqueues through ``kiq``."""

    def __init__(
        self,
        settings: Settings,
        triggers: Iterable[Trigger],
        *,
        kiq: Kiq,
        sink: ResultSink,
        remote: bool,
        stats: Stats | None = None,
        config_hooks: Mapping[str, ConfigHook] | None = None,
        dedup: DedupStore | None = None,
    ) -> None:
        self._settings = settings
        self.config_hooks = dict(config_hooks or {})
        self.dedup = dedup
        self.kiq = kiq
        self.sink = sink
        self.remote = remote
        self.stats = stats or Stats()
        #: Enqueues retrying after a failure, and the last failure (``/readyz`` tells it).
        self.enqueues_retrying = 0
        self.enqueue_error: str | None = None
        self.triggers: dict[str, TriggerState] = {}
        for cfg in triggers:
            self.add_trigger(cfg)
        self._global = anyio.CapacityLimiter(settings.max_concurrent_runs)
        # Bounds the handlers that wait for a slot: beyond it, sources wait (backpressure).
        self._pending = anyio.Semaphore(settings.max_concurrent_runs * 4)
        # The tasks that run plain triggers' events, one per global slot at most (.carriers).
        self.carriers = Carriers(self._handle, lambda: self._global.total_tokens)

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings (a reload): the chains are built again from them (payload limits,
        default reply topics); each trigger's run-time state stays."""
        self._settings = settings
        for state in self.triggers.values():
            state.chain = self._chain(state.cfg)

    # ------------------------------------------------------------- triggers

    def add_trigger(self, cfg: Trigger) -> TriggerState:
        """Register (or replace) a trigger; its source is the caller's business."""
        state = TriggerState(cfg, self._chain(cfg), limiter=limiter_for(cfg))
        if isinstance(cfg, MqttTrigger):
            state.pattern = compile_topic(cfg.topic)
        self.triggers[cfg.name] = state
        return state

    def remove_trigger(self, name: str) -> TriggerState | None:
        """Forget a trigger; its runs in flight go on and are still counted daemon-wide."""
        return self.triggers.pop(name, None)

    def _chain(self, cfg: Trigger) -> tuple[Stage, ...]:
        """The stages ``cfg`` asks for, in order; policies it does not use cost nothing."""
        mqtt = self._settings.mqtt
        stages: list[Stage] = []
        if isinstance(cfg, MqttTrigger):
            stages.append(Decode(cfg, mqtt))
            hook = self.config_hooks.get(cfg.pipeline)
            if hook is not None:
                stages.append(ConfigHookStage(hook))
        if cfg.dedup_key and self.dedup is not None:
            stages.append(Dedup(cfg, cfg.dedup_key, self.dedup, self.sink, mqtt))
        if cfg.overlap == "skip":
            stages.append(SKIP_WHILE_RUNNING)
        if isinstance(cfg, MqttTrigger) and cfg.key:
            stages.append(PerKey(cfg.key))
        return tuple(stages)

    def mqtt_matches(self, topic: str) -> list[tuple[TriggerState, dict[str, str]]]:
        out = []
        for state in self.triggers.values():
            if state.pattern is not None and state.cfg.enabled:
                fields = state.pattern.match(topic)
                if fields is not None:
                    out.append((state, fields))
        return out

    # ------------------------------------------------------------- admission

    async def submit(self, event: TriggerEvent, runs: TaskGroup) -> None:
        """Accept one event; returns once a handler owns it (may wait: backpressure)."""
        self.stats.events += 1
        state = self.triggers.get(event.trigger)
        if state is None or not state.cfg.enabled or state.paused:
            await _ack(event)
            return
        state.fired += 1
        cfg = state.cfg
        admission = Admission(state, event, new_run_id(), {**cfg.inputs, **event.inputs}, cfg.run)
        try:
            for stage in state.chain:
                rejection = await stage(admission)
                if rejection is not None:
                    await self.reject(admission, rejection)
                    return
        except Exception as exc:  # a store or the broker failing: this event, not the daemon
            await self._admission_failed(admission, exc)
            return
        request = self._request(admission)
        if tracing.active():
            request.trace = tracing.trigger(request, event.meta.get("user_properties"))
        key = admission.key
        if key is not None and isinstance(cfg, MqttTrigger) and cfg.debounce:
            await self._debounce(cfg, admission, request, runs)
            return
        await take(self._pending)
        if cfg.overlap == "skip":
            # Under way from here on, not only once its task has started: the next event
            # of a burst (messages read together are handed over in one loop turn) must be
            # skipped, not admitted beside it. _handle takes it out when it is done.
            state.running[request.run_id] = None
        if key is not None and isinstance(cfg, MqttTrigger):
            slot_for(state, cfg, key).users += 1
        elif state.limiter is None and cfg.overlap != "replace" and not self.remote:
            # A plain trigger's event waits only for a global slot: see .carriers.
            self.carriers.hand(admission, request, runs)
            return
        runs.start_soon(self._handle, admission, request, name=f"run:{request.run_id}")

    async def _admission_failed(self, admission: Admission, exc: Exception) -> None:
        """A stage failed (a dedup store's disk, the broker): logged, its dedup key released,
        and the message left unacknowledged, so the broker delivers it again (at least once)
        instead of the error ending the daemon."""
        state = admission.state
        state.failed += 1
        log.error("admission_failed", trigger=state.cfg.name, error=f"{type(exc).__name__}: {exc}")
        if admission.dedup_key is not None and self.dedup is not None:
            try:
                await self.dedup.forget(admission.dedup_key)
            except Exception as forget_exc:  # the same store, likely failing too
                log.error(
                    "dedup_forget_failed", dedup_key=admission.dedup_key, error=str(forget_exc)
                )

    async def reject(self, admission: Admission, rejection: Rejection) -> None:
        """An event that is not run: its error result or log line, its counter, its ack.

        A dedup key the event claimed is released: a message that never ran
        must not make a redelivery of itself a duplicate.
        """
        state, event = admission.state, admission.event
        kind = rejection.kind
        if kind == "bad_input":
            self.stats.bad_input += 1
            if rejection.log is not None:
                log.warning(rejection.log, trigger=state.cfg.name, **rejection.detail)
            await self._emit_error(state, event, PayloadError(rejection.reason))
        else:
            if kind == "duplicate":
                self.stats.duplicates += 1
            elif kind == "skipped":
                state.skipped += 1
                self.stats.skipped += 1
            else:
                state.skipped += 1
                self.stats.coalesced += 1
            log.info(rejection.log or f"run_{kind}", trigger=state.cfg.name, **rejection.detail)
        if admission.dedup_key is not None and self.dedup is not None:
            await self.dedup.forget(admission.dedup_key)
        await _ack(event)

    def _request(self, admission: Admission) -> RunRequest:
        """The run request of an admitted event (built once, after every stage)."""
        cfg, event = admission.state.cfg, admission.event
        meta = event.meta
        file_path = event.inputs.get("file_path")
        return RunRequest(
            pipeline=cfg.pipeline,
            inputs=admission.inputs,
            overrides=dict(admission.overrides),
            run_id=admission.run_id,
            trigger=TriggerInfo(
                name=cfg.name,
                type=event.kind,
                topic=meta.get("topic"),
                fields=dict(meta.get("fields") or {}),
                file_path=file_path if isinstance(file_path, str) else None,
                scheduled=meta.get("scheduled"),
                catch_up=bool(meta.get("catch_up")),
            ),
            queued_at=event.at,
            reply=reply_for(cfg, event, admission.run_id, self._settings.mqtt, admission.reply_to),
            dedup_key=admission.dedup_key,
            required_inputs=admission.required_inputs,
        )

    async def _emit_error(
        self, state: TriggerState, event: TriggerEvent, exc: PayloadError
    ) -> None:
        """The error result of an event that was refused (it never became a run)."""
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
            reply=reply_for(cfg, event, run_id, self._settings.mqtt),
        )
        error = ErrorInfo(type(exc).__name__, str(exc), None, False)
        self.stats.runs_failed += 1
        state.failed += 1
        await self.sink.emit(request, RunResult.not_run(request, "failed", error))

    # ------------------------------------------------------------ per-key bursts

    async def _debounce(
        self, cfg: MqttTrigger, admission: Admission, request: RunRequest, runs: TaskGroup
    ) -> None:
        """Hold the key's latest message until ``debounce`` seconds pass without a newer one."""
        state, key = admission.state, admission.key
        assert key is not None and cfg.debounce is not None
        slot = state.keys.get(key)
        deadline = anyio.current_time() + cfg.debounce
        if slot is not None and slot.debounced is not None:
            older = slot.debounced
            slot.debounced, slot.request, slot.deadline = admission, request, deadline
            await self._coalesce(older)
            return
        await take(self._pending)
        slot = slot_for(state, cfg, key)
        slot.users += 1
        slot.debounced, slot.request, slot.deadline = admission, request, deadline
        runs.start_soon(self._debounced, state, slot, name=f"debounce:{cfg.name}")

    async def _debounced(self, state: TriggerState, slot: KeySlot) -> None:
        # Each newer message moves the deadline; sleep until it stops moving.
        while (delay := slot.deadline - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(delay)
        admission, request = slot.debounced, slot.request
        assert admission is not None and request is not None
        slot.debounced = slot.request = None
        await self._handle(admission, request)

    async def _coalesce(self, admission: Admission) -> None:
        """A message that a newer one on the same key stands for: not run, acked, counted."""
        detail = {"run_id": admission.run_id}
        await self.reject(admission, Rejection("coalesced", log=_COALESCED, detail=detail))

    # ------------------------------------------------------------------ runs

    async def run_request(self, request: RunRequest) -> None:
        """Run a request no trigger produced (a manual run): global limit, then ``kiq``."""
        if tracing.active() and request.trace is None:
            request.trace = tracing.trigger(request, since_queued=False)
        if self.remote:
            await self.kiq(request)
            return
        async with maybe(self._global):
            self.stats.in_flight += 1
            try:
                await self.kiq(request)
            finally:
                self.stats.in_flight -= 1

    async def _enqueue(self, request: RunRequest) -> None:
        """Hand ``request`` to the Redis queue, trying again until it is there.

        A failed enqueue (Redis restarting, say) is transient for a request we
        built ourselves; its MQTT message stays unacked meanwhile, and the
        broker would deliver it again only after a reconnect, so a failure is
        retried here, with capped backoff, until it works or the daemon stops.
        """
        failures = 0
        try:
            while True:
                try:
                    await self.kiq(request)
                    return
                except Exception as exc:
                    failures += 1
                    if failures == 1:
                        self.enqueues_retrying += 1
                    self.enqueue_error = str(exc.__cause__ or exc)
                    delay = _ENQUEUE_BACKOFF.delay(failures)
                    log.warning(
                        "enqueue_failed",
                        run_id=request.run_id,
                        error=self.enqueue_error,
                        attempt=failures,
                        retry_in_s=round(delay, 2),
                    )
                    await anyio.sleep(delay)
        finally:
            if failures:
                self.enqueues_retrying -= 1

    async def _handle(self, admission: Admission, request: RunRequest) -> None:
        state, event, key = admission.state, admission.event, admission.key
        slot = state.keys.get(key) if key is not None else None
        held = False
        try:
            if slot is not None and slot.limiter is not None and not self.remote:
                cfg = state.cfg
                held = await take_turn(slot, isinstance(cfg, MqttTrigger) and cfg.coalesce)
                if not held:
                    await self._coalesce(admission)
                    return
            if self.remote:
                await self._enqueue(request)
                await _ack(event)
                return
            replace = state.cfg.overlap == "replace"
            if replace:
                cancel_running(state)
            async with maybe(state.limiter), maybe(self._global):
                self.stats.in_flight += 1
                try:
                    if replace:
                        replaced = await run_replaceable(state, request, self.kiq)
                    else:
                        state.running[request.run_id] = None
                        await self.kiq(request)
                        replaced = False
                    if replaced:  # its `cancelled` result is the job tracker's (jobs.py)
                        await self._forget_key(request)
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
            state.running.pop(request.run_id, None)  # also one that never ran (see submit)
            self._pending.release()
            if slot is not None and key is not None:
                if held:
                    assert slot.limiter is not None
                    slot.limiter.release()
                release_slot(state, key, slot)

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


async def _ack(event: TriggerEvent) -> None:
    if event.ack is not None:
        await event.ack()
