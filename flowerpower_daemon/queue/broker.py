"""taskiq is the queue: a broker factory and the one task, ``run_pipeline``.

- ``memory``: taskiq's ``InMemoryBroker`` with ``await_inplace``: ``kiq``
  runs the task in the calling coroutine, so the caller knows when the run
  is finished and its result published (then it acks the MQTT message), with
  no result polling.
- ``redis://``: taskiq-redis ``RedisStreamBroker`` (consumer group, acks,
  reclaim of runs whose worker died) plus a Redis result backend;
  ``kiq`` returns once the request is durably in the stream, and
  ``flowerpower-daemon worker`` processes execute it. Two fixes over the
  stock broker (``ReclaimingStreamBroker``): it reclaims runs of a dead
  worker also while the stream is idle (taskiq-redis 1.2 looks for them only
  after new messages arrived), and a live worker keeps its own runs claimed
  (a heartbeat; see :mod:`.streams`), so ``queue.reclaim_after`` means "the worker is gone", not
  "the run takes long". A :class:`RunLedger` remembers each delivery of an
  unfinished run, so the run a worker reclaims reports the lost attempts in
  ``attempts``, and a run whose workers died ``queue.max_deliveries`` times
  is recorded as failed instead of killing the next worker too.
- ``redis+sentinel://`` (or ``queue.sentinel``) and ``redis+cluster://`` (or
  ``queue.cluster``): the same over taskiq-redis's Sentinel and Cluster stream
  brokers and result backends, with the same reclaim and heartbeat
  (:mod:`.streams`); every client comes from :mod:`..state.stores`.

In memory mode the request object itself goes through taskiq
(:class:`InProcessFormatter`): serialising it to hand it to the same process
cost ~5% of the event loop's time per run. On Redis, messages are serialised
with orjson (taskiq's default is the standard library's ``json``, several
times slower per run). The task is registered
on a broker made per daemon (no module-level
registry); it runs the request through the runner and hands the result to
the sinks, so nobody waits for a result by polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import anyio
import orjson
import structlog
from taskiq import AsyncBroker, AsyncTaskiqDecoratedTask, InMemoryBroker
from taskiq.abc.formatter import TaskiqFormatter
from taskiq.acks import AckController
from taskiq.message import BrokerMessage, TaskiqMessage
from taskiq.receiver import Receiver
from taskiq.result import TaskiqResult
from taskiq.result_backends.dummy import DummyResultBackend
from taskiq.serializers import ORJSONSerializer

from .. import tracing
from ..mqtt.sinks import MqttResultSink, ResultSink
from ..project.encoding import encode_result
from ..project.models import AttemptInfo, ErrorInfo, RunRequest, RunResult, utcnow
from ..project.runner import PipelineRunner
from ..settings import QueueSettings, RedisTarget
from ..state.batch import WriteBatch
from ..state.dedup import DEFAULT_TTL, DedupStore
from ..state.stores import RedisClient, RedisStore

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = [
    "RUN_COMPUTED",
    "TASK_NAME",
    "InProcessFormatter",
    "InProcessReceiver",
    "InProcessRequest",
    "RunExecutor",
    "RunLedger",
    "TaskArg",
    "TaskResult",
    "create_broker",
    "register_run_task",
    "worker_name",
]

TASK_NAME = "flowerpower.run_pipeline"
log = structlog.get_logger("flowerpower_daemon.queue")


class InProcessFormatter(TaskiqFormatter):
    """The in-memory broker's formatter: the message object is handed over, not encoded.

    ``dumps`` keeps the :class:`TaskiqMessage` under its task id and puts the id in
    the broker message; ``loads`` (the receiver, in the same process) takes it back.
    The caller of ``kiq`` calls :meth:`forget` afterwards, for a message that never
    reached the receiver (the kick failed).
    """

    def __init__(self) -> None:
        self._held: dict[str, TaskiqMessage] = {}

    def dumps(self, message: TaskiqMessage) -> BrokerMessage:
        self._held[message.task_id] = message
        # Validated, not ``model_construct``: pydantic's Rust validator builds these four
        # plain fields in a third of the time of its Python-level ``model_construct``.
        return BrokerMessage(
            task_id=message.task_id,
            task_name=message.task_name,
            message=message.task_id.encode(),
            labels=message.labels,
        )

    def loads(self, message: bytes) -> TaskiqMessage:
        return self._held.pop(message.decode())

    def forget(self, task_id: str) -> None:
        self._held.pop(task_id, None)


class InProcessReceiver(Receiver):
    """The in-memory broker's receiver, without a dependency context for a task that
    takes no dependencies.

    taskiq's ``run_task`` builds one for every run of a task with a dependency graph,
    and every task has one, even an empty one: a ``Context``, a resolver that
    resolves nothing and its ``close``, some microseconds per run. ``run_pipeline``
    takes only its argument, so its graph is dropped and ``run_task`` skips all that;
    a task that does declare ``TaskiqDepends`` keeps its graph.
    """

    def _prepare_task(self, name: str, handler: Callable[..., object]) -> None:
        super()._prepare_task(name, handler)
        graph = self.dependency_graphs.get(name)
        if graph is not None and graph.is_empty():
            del self.dependency_graphs[name]

    async def run_task(
        self,
        target: Callable[..., Any],
        message: TaskiqMessage,
        ack_controller: AckController | None = None,
    ) -> TaskiqResult[Any]:
        """taskiq's, but a run's cancellation goes on to ``kiq``'s caller.

        taskiq catches every BaseException of a task as its error, so a run cancelled
        by its caller (a shutdown's deadline or second signal, ``flowerpowerctl
        cancel``, overlap ``replace``) came back from ``kiq`` as if it had ended, and
        the dispatcher acked its MQTT message: lost, where a run cut short by a
        shutdown must come again at the next start."""
        result = await super().run_task(target, message, ack_controller)
        if isinstance(result.error, asyncio.CancelledError):
            raise result.error
        return result


class InProcessRequest:
    """A run request for an in-process task, handed over as is: taskiq turns a
    dataclass argument into a dict (``asdict``, a deep copy), which this is not."""

    __slots__ = ("request",)

    def __init__(self, request: RunRequest) -> None:
        self.request = request


def worker_name() -> str:
    """This process as results, the run ledger and the workers listing name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: Set by a worker's stream loop (:mod:`.consume`) in each run's task: called once the
#: run has its result, before the result is published and recorded, so that the run's
#: slot takes the next run while the result waits for the broker's PUBACK.
RUN_COMPUTED: ContextVar[Callable[[], None] | None] = ContextVar("run_computed", default=None)

TaskArg = InProcessRequest | Mapping[str, object]
"""The run task's argument: the request itself in memory mode, its dict through Redis."""

TaskResult = dict[str, object]
"""The run task's return value: the result message as a dict (``RunResult.to_dict``)."""


def create_broker(settings: QueueSettings, *, worker: bool = False) -> AsyncBroker:
    """The taskiq broker for ``queue.broker``."""
    if not settings.is_redis:
        # Nobody reads an in-memory task's result (the task hands it to the sinks), so
        # storing it in taskiq's result backend would only cost time per run. Its pool
        # for sync tasks stays unused (and so without threads): the task is async.
        memory = InMemoryBroker(await_inplace=True, cast_types=False, sync_tasks_pool_size=1)
        memory.receiver = InProcessReceiver(
            broker=memory,
            executor=memory.executor,
            validate_params=False,  # cast_types=False
            max_async_tasks=30,  # InMemoryBroker's default
            propagate_exceptions=True,
        )
        return memory.with_result_backend(DummyResultBackend()).with_formatter(InProcessFormatter())
    from .streams import (
        ReclaimingClusterStreamBroker,
        ReclaimingSentinelStreamBroker,
        ReclaimingStreamBroker,
    )

    target = settings.redis
    idle_timeout = int(settings.reclaim_after * 1000)
    queue, group = settings.queue_name, settings.consumer_group
    broker: AsyncBroker
    if target.mode == "sentinel":
        broker = ReclaimingSentinelStreamBroker(
            target,
            idle_timeout=idle_timeout,
            queue_name=queue,
            consumer_group_name=group,
            xread_block=1000,
        )
    elif target.mode == "cluster":
        broker = ReclaimingClusterStreamBroker(
            target,
            idle_timeout=idle_timeout,
            queue_name=queue,
            consumer_group_name=group,
            xread_block=1000,
        )
    else:
        broker = ReclaimingStreamBroker(
            target.url,
            queue_name=queue,
            consumer_group_name=group,
            idle_timeout=idle_timeout,
            xread_block=1000,
        )
    # The run task publishes its own result and records it in the history: nobody reads
    # taskiq's result backend, whose Redis keys only cost a write and ~280 B per run.
    return broker.with_result_backend(DummyResultBackend()).with_serializer(ORJSONSerializer())


# The starts of one unfinished run, a string of "<unix time> <worker>\n" entries, oldest
# first (a first start is one SET ... EX; a list left by an earlier version is read too).
_STARTED = """
local earlier
if redis.call('TYPE', KEYS[1]).ok == 'list' then
  earlier = table.concat(redis.call('LRANGE', KEYS[1], 0, -1), '\\n') .. '\\n'
else
  earlier = redis.call('GET', KEYS[1]) or ''
end
redis.call('SET', KEYS[1], earlier .. ARGV[1] .. '\\n', 'EX', ARGV[2])
return earlier
"""

# Take one entry back; the key goes with its last entry.
_WITHDRAW = """
local notes = redis.call('GET', KEYS[1])
if not notes then return 0 end
local from, to = string.find(notes, ARGV[1] .. '\\n', 1, true)
if not from then return 0 end
local rest = string.sub(notes, 1, from - 1) .. string.sub(notes, to + 1)
if rest == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], rest, 'KEEPTTL') end
return 1
"""

Lost = tuple[datetime, str]


class RunLedger(RedisStore):
    """Each start of an unfinished run, in Redis at ``<prefix>:<run_id>``; one client.

    A worker notes a run when it starts it and deletes the note when the run
    is finished (or withdraws its own start when it is cancelled, e.g. by a
    shutdown: that attempt was interrupted, not lost). So the worker that
    reclaims a run from a dead one finds the lost starts. A Redis error is
    logged and treated as "no earlier start": the run goes on. The note is a
    string of ``"<unix time> <worker>\n"`` entries; with :attr:`batch` set (a
    worker), a first delivery's note (one ``SET ... EX``) and the ``DEL`` go
    out with the worker's other writes (the run starts once its note has
    left the process: :meth:`.WriteBatch.sent`), and only a reclaimed run's
    start reads the earlier entries (a script).
    """

    def __init__(
        self,
        url: RedisTarget | str,
        prefix: str,
        *,
        who: str | None = None,
        ttl: float = 86400.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.who = who or worker_name()
        self.ttl = ttl

    # Registered on each new client by _scripts.
    _started: AsyncScript
    _withdraw: AsyncScript
    #: Set by a worker: notes and clean-ups go out with its other writes (one round trip).
    batch: WriteBatch | None = None

    def _scripts(self, redis: RedisClient) -> None:
        self._started = redis.register_script(_STARTED)
        self._withdraw = redis.register_script(_WITHDRAW)

    async def started(self, run_id: str, *, first: bool = False) -> tuple[list[Lost], str]:
        """Note this start; the earlier starts (when, which worker) and this start's entry.

        ``first``: the message is a first delivery (not reclaimed), so there is no
        earlier start to read: the note alone goes out, with the batch's other writes.
        """
        entry = f"{time.time()!r} {self.who}"
        if first and self.batch is not None:
            key, note, ttl = f"{self.prefix}:{run_id}", f"{entry}\n", max(1, int(self.ttl))
            # Once the note has left the process: a worker killed from here on still gets it
            # into Redis (the kernel sends a dead process's socket buffer); no reply awaited.
            await self.batch.sent(
                lambda pipe: pipe.execute_command("SET", key, note, "EX", ttl), "run_ledger_failed"
            )
            return [], entry
        try:
            raw = await self._started(
                keys=[f"{self.prefix}:{run_id}"], args=[entry, max(1, int(self.ttl))]
            )
        except Exception as exc:  # redis.RedisError, OSError ...
            log.error("run_ledger_failed", error=str(exc))
            return [], entry
        earlier: list[Lost] = []
        for item in (raw.decode() if isinstance(raw, bytes) else str(raw)).splitlines():
            ts, _, who = item.partition(" ")
            earlier.append((datetime.fromtimestamp(float(ts), UTC), who))
        return earlier, entry

    async def finished(self, run_id: str) -> None:
        if self.batch is not None:
            key = f"{self.prefix}:{run_id}"
            self.batch.send(lambda pipe: pipe.execute_command("DEL", key), "run_ledger_failed")
            return
        try:
            await self._redis.delete(f"{self.prefix}:{run_id}")
        except Exception as exc:
            log.error("run_ledger_failed", error=str(exc))

    async def withdraw(self, run_id: str, entry: str) -> None:
        """Take back this worker's start of ``run_id`` (the attempt was cancelled)."""
        try:
            await self._withdraw(keys=[f"{self.prefix}:{run_id}"], args=[entry])
        except Exception as exc:
            log.error("run_ledger_failed", error=str(exc))


class RunExecutor:
    """What the task does: run the request, emit the result, count it.

    In the daemon (memory queue) the dispatcher has claimed the request's
    dedup key already; this only completes it. A ``flowerpower-daemon
    worker`` passes ``claim_ttls`` (``dedup_ttl`` per trigger name), so that it
    claims the key itself before running, and a ``ledger``, so that a run
    reclaimed from a dead worker reports the lost attempts and is given up
    (recorded as failed) after ``max_deliveries`` lost ones.

    Every result names where it ran (``RunResult.worker``): ``who``, by default
    this process's ``<hostname>:<pid>``. ``done`` counts the finished runs.
    """

    def __init__(
        self,
        runner: PipelineRunner,
        sink: ResultSink,
        on_result: Callable[[RunRequest, RunResult], Awaitable[None]] | None = None,
        dedup: DedupStore | None = None,
        *,
        claim_ttls: Mapping[str, float] | None = None,
        ledger: RunLedger | None = None,
        max_deliveries: int = 3,
        who: str | None = None,
        first_delivery: Callable[[str], bool] | None = None,
    ) -> None:
        self.runner = runner
        #: Whether a run id's message is a first delivery (no earlier start to look up in the
        #: ledger); without it every start reads the ledger.
        self.first_delivery = first_delivery
        self.who = who or worker_name()
        self.done = 0
        #: Runs not run because their dedup key was claimed already (worker ``/metrics``).
        self.duplicates = 0
        self.sink = sink
        self.on_result = on_result
        self.dedup = dedup
        self.claim_ttls = claim_ttls
        self.ledger = ledger
        self.max_deliveries = max_deliveries

    async def __call__(self, request_data: TaskArg) -> TaskResult:
        # The object itself in memory mode (InProcessFormatter), its dict from Redis.
        if isinstance(request_data, InProcessRequest):
            request = request_data.request
        else:
            request = RunRequest.from_dict(request_data)
        t0 = time.perf_counter()
        # Tokens, not ``bound_contextvars``: that one reads the whole context to restore it.
        tokens = structlog.contextvars.bind_contextvars(
            run_id=request.run_id, pipeline=request.pipeline, trigger=request.trigger.name
        )
        traced = tracing.start_run(request)  # None unless tracing is on
        try:
            if self.claim_ttls is None and self.ledger is None:
                result = await self.runner.run(request)
            else:
                shared = await self._run_shared(request)
                if shared is None:
                    return {"run_id": request.run_id, "status": "duplicate"}
                result = shared
            computed = RUN_COMPUTED.get()
            if computed is not None:  # the run is over; its result's way out is not
                computed()
            result.worker = self.who
            if traced is not None:
                traced.finish(result)
            if self.dedup is not None and request.dedup_key is not None:
                # Stored before publishing: a crash after publishing re-publishes, never reruns.
                try:
                    await self.dedup.complete(request.dedup_key, encode_result(result))
                except Exception as exc:  # the result still goes out
                    log.error("dedup_complete_failed", dedup_key=request.dedup_key, error=str(exc))
            await self.sink.emit(request, result)
            if self.on_result is not None:
                await self.on_result(request, result)
            if self.ledger is not None:
                await self.ledger.finished(request.run_id)
            self.done += 1
            error = result.error
            # A failed run is a warning, so `journalctl -p warning` lists every one of them.
            # Checked first: the arguments (two ``round``s, ~3k instructions each) are built
            # even when the level drops the line, as it does a success at WARNING.
            if error is not None or log.is_enabled_for(logging.INFO):
                (log.info if error is None else log.warning)(
                    "run_finished",
                    status=result.status,
                    attempts=len(result.attempts),
                    duration_ms=round(result.duration_ms, 3),
                    total_ms=round((time.perf_counter() - t0) * 1000, 3),
                    error=error.message if error else None,
                    error_type=error.type if error else None,
                    node=error.node if error else None,
                )
        finally:
            if traced is not None:
                traced.close()
            structlog.contextvars.reset_contextvars(**tokens)
        return {"run_id": result.run_id, "status": result.status}

    async def _run_shared(self, request: RunRequest) -> RunResult | None:
        """A worker's run: claim the dedup key, note the start; ``None`` for a duplicate."""
        key = request.dedup_key
        if self.claim_ttls is not None and self.dedup is not None and key is not None:
            ttl = self.claim_ttls.get(request.trigger.name, DEFAULT_TTL)
            try:
                claim, earlier = await self.dedup.claim(key, request.run_id, ttl)
            except Exception as exc:  # at least once: run it
                log.error("dedup_claim_failed", dedup_key=key, error=str(exc))
                claim, earlier = "new", None
            if claim != "new":
                log.info("duplicate_not_run", dedup_key=key, state=claim)
                self.duplicates += 1
                if earlier is not None and isinstance(self.sink, MqttResultSink):
                    ok = orjson.loads(earlier).get("status") == "success"
                    await self.sink.publish_encoded(request.reply, earlier, ok=ok)
                if self.ledger is not None:
                    await self.ledger.finished(request.run_id)  # e.g. a reclaimed finished run
                return None
        if self.ledger is None:
            return await self.runner.run(request)
        first = self.first_delivery is not None and self.first_delivery(request.run_id)
        lost, entry = await self.ledger.started(request.run_id, first=first)
        reclaimed_at = utcnow()
        if lost:
            log.warning("run_reclaimed_runs_again", lost_attempts=len(lost))
        if len(lost) >= self.max_deliveries:
            log.error("run_given_up_workers_lost", lost_attempts=len(lost))
            given_up = RunResult.not_run(
                request,
                "failed",
                ErrorInfo(
                    "WorkerLost",
                    f"the worker stopped during each of {len(lost)} attempts "
                    f"(queue.max_deliveries {self.max_deliveries}): not run again",
                    None,
                    False,
                ),
            )
            return _with_lost(dataclasses.replace(given_up, attempts=()), lost, reclaimed_at)
        try:
            result = await self.runner.run(request)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.ledger.withdraw(request.run_id, entry)
            raise
        return _with_lost(result, lost, reclaimed_at) if lost else result


def _with_lost(result: RunResult, lost: list[Lost], reclaimed_at: datetime) -> RunResult:
    """``result`` with the attempts lost with their workers first (ended when reclaimed)."""
    earlier = tuple(
        AttemptInfo(
            i + 1,
            started,
            reclaimed_at,
            "failed",
            ErrorInfo(
                "WorkerLost",
                f"worker {who} stopped before this attempt finished; the run was reclaimed",
                None,
                True,
            ),
        )
        for i, (started, who) in enumerate(lost)
    )
    later = tuple(dataclasses.replace(a, number=a.number + len(earlier)) for a in result.attempts)
    attempts = earlier + later
    return dataclasses.replace(
        result,
        attempts=attempts,
        started_at=min(result.started_at, attempts[0].started_at),
        encoded=None,
    )


RunTask = AsyncTaskiqDecoratedTask[[TaskArg], TaskResult]


def register_run_task(broker: AsyncBroker, executor: RunExecutor) -> RunTask:
    """Register ``run_pipeline`` on this broker only."""

    async def run_pipeline(request: TaskArg) -> TaskResult:
        return await executor(request)

    task = broker.register_task(run_pipeline, task_name=TASK_NAME)
    return cast("RunTask", task)
