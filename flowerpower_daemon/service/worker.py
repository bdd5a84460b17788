"""``flowerpower-daemon worker``: runs taken from the Redis stream, results published.

A worker runs no triggers: it executes the requests the daemons enqueue
(``queue.broker: redis://...``), publishes each result on MQTT like the
daemon would, records it in the shared Redis history, and shares dedup keys
and the run-start ledger with every other daemon and worker (see dedup.py
and queue.py).

SIGTERM/SIGINT stop it as they stop the daemon: it takes no new run from
the stream, lets the running ones finish within ``shutdown_timeout`` and
publish their results, flushes its outbox (bounded), and exits 0. A run
still going at the deadline is cancelled: unacked, it stays in the stream
and another worker reclaims it. A second signal, a second or more after
the first, cancels at once (one sooner is the same stop delivered twice: a
dying supervisor's parent-death signal can come once per thread it loses).

Under systemd (``Type=notify``) it says ``READY=1`` once it consumes from the
stream, pings ``WATCHDOG=1`` from its event loop and says ``STOPPING=1`` when
it begins to drain. Every few seconds it records itself in Redis (name
``<hostname>:<pid>``, runs in flight, runs done, last seen) for the daemon's
``status``; it leaves the listing when it stops.

``--processes N`` runs N such workers under one parent: see
:mod:`.supervisor`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from datetime import UTC, datetime

import anyio
import structlog

from ..errors import ConfigError, ConfigProblem
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..redact import redact_url
from ..settings import Settings
from ..state.history import history_for
from .lifecycle import freeze_heap, shielded
from .systemd import Notifier

__all__ = ["run_worker"]

#: Seconds between two records of a worker in the live workers' listing.
BEAT_EVERY = 2.0
#: A second stop signal cancels the runs only this long after the first (sooner, it is
#: the same request delivered twice).
REPEAT_AFTER = 1.0

log = structlog.get_logger("flowerpower_daemon.worker")


async def run_worker(settings: Settings, http: tuple[str, int] | None = None) -> None:
    """``flowerpower-daemon worker``: execute runs from the Redis stream and publish results
    (``http``: serve /metrics, /healthz and /readyz there, ``--http``)."""
    from ..mqtt.link import MqttLink
    from ..observe import metrics_for
    from ..queue.broker import (
        TASK_NAME,
        RunExecutor,
        RunLedger,
        create_broker,
        worker_name,
    )
    from ..queue.consume import StreamConsumer
    from ..queue.streams import Reclaiming, WorkerPresence
    from ..queue.threads import ElasticThreadPool
    from ..state.batch import WriteBatch
    from ..state.dedup import RedisDedupStore, dedup_prefix
    from ..state.history import RedisHistory

    if not settings.queue.is_redis:
        raise ConfigError(
            [
                ConfigProblem(
                    "config",
                    "queue.broker",
                    "a worker needs queue.broker: redis://...; 'memory' runs in the daemon",
                )
            ]
        )
    project = FlowerPowerProject.load(settings.project, storage_options=settings.storage_options)
    client_id = f"{settings.mqtt.client_id}-worker-{socket.gethostname()}-{os.getpid()}"
    link = MqttLink(settings.mqtt, client_id=client_id)
    metrics = metrics_for(http is not None)
    sink = metrics.result_sink(
        link,
        qos=settings.mqtt.result_qos,
        max_bytes=settings.mqtt.max_result_bytes,
        result_store=settings.mqtt.result_store,
    )
    broker = create_broker(settings.queue, worker=True)
    broker.is_worker_process = True
    who = worker_name()
    notifier = Notifier()
    if isinstance(broker, Reclaiming):
        # The consumer in the group says which worker it is (XINFO CONSUMERS); the
        # suffix keeps a restarted worker with the same pid (a container's 1) apart.
        broker.consumer_name = f"{who}-{uuid.uuid4().hex[:8]}"
    history = history_for(settings)  # Redis: the daemon's `flowerpowerctl jobs` sees these runs
    homeassistant = None
    if settings.homeassistant.discovery:  # each run updates its Home Assistant sensor too
        from .homeassistant import HomeAssistant

        homeassistant = HomeAssistant(settings, link)

    async def record(request: RunRequest, result: RunResult) -> None:
        metrics.run_finished(request, result)
        await history.record(result)
        if homeassistant is not None:
            await homeassistant.publish_state(result)

    queue = settings.queue
    # Shared with every daemon and worker: dedup keys (claimed here, as runs start) and
    # the starts of unfinished runs (so that a reclaimed run knows its lost attempts).
    dedup = RedisDedupStore(queue.redis, dedup_prefix(queue))
    ledger = RunLedger(queue.redis, f"{queue.queue_name}:started", who=who)
    presence = WorkerPresence(queue.redis, queue.queue_name, ttl=5 * BEAT_EVERY)
    # One round trip carries the ledger notes, history entries and acks of every run that
    # wrote meanwhile (group commit), instead of a round trip per write.
    batch = WriteBatch(queue.redis)
    ledger.batch = batch
    if isinstance(history, RedisHistory):
        history.batch = batch
    if isinstance(broker, Reclaiming):
        broker.write_batch = batch
    executor = RunExecutor(
        project.runner,
        sink,
        on_result=record,
        dedup=dedup,
        claim_ttls={t.name: t.dedup_ttl for t in settings.triggers},
        ledger=ledger,
        max_deliveries=queue.max_deliveries,
        who=who,
        first_delivery=broker.first_delivery if isinstance(broker, Reclaiming) else None,
    )
    # Each stream entry one run, at most worker_concurrency at once (consume.py).
    consumer = StreamConsumer(
        broker.listen,
        executor,
        task_name=TASK_NAME,
        concurrency=settings.queue.worker_concurrency,
    )
    if isinstance(broker, Reclaiming):
        broker.read_count = consumer.room
    # As in the daemon: sync pipelines in a pool that grows only while runs are stuck.
    pool = ElasticThreadPool(queue.worker_concurrency)
    project.runner.executor = pool
    await broker.startup()
    # Set at the first signal: the stream loop takes no new run; the running ones finish.
    finish = asyncio.Event()
    started_at = datetime.now(UTC).isoformat()

    def status_line() -> str:
        return f"{consumer.in_flight} running, {executor.done} done"

    beating = anyio.CancelScope()  # cancelled before the worker leaves the listing

    async def beat() -> None:
        with beating:
            while True:
                await presence.beat(
                    who,
                    in_flight=consumer.in_flight,
                    done=executor.done,
                    concurrency=queue.worker_concurrency,
                    started_at=started_at,
                )
                await anyio.sleep(BEAT_EVERY)

    consumed: list[bool] = []

    def consuming() -> None:
        log.info("worker_consuming", consumer=getattr(broker, "consumer_name", who))
        consumed.append(True)
        notifier.ready(status_line())

    def not_ready() -> str | None:
        if finish.is_set():
            return "stopping"
        if not consumed:
            return "not consuming from the stream yet"
        return None if link.connected else "MQTT broker not connected"

    if http is not None:
        from ..observe.endpoints import worker_endpoints
        from ..observe.prom import PromMetrics
        from ..observe.server import HttpServer

        assert isinstance(metrics, PromMetrics)
        endpoints = worker_endpoints(
            metrics,
            link=link,
            sink=sink,
            executor=executor,
            in_flight=lambda: consumer.in_flight,
            not_ready=not_ready,
        )
        server = HttpServer(http, endpoints.routes(), key="--http")

    try:
        if http is not None:
            await server.bind()  # a busy port: a one-line error, the broker shut down below
        async with history, dedup, ledger, presence, batch, anyio.create_task_group() as tg:
            await tg.start(link.run, name="mqtt-link")
            await tg.start(batch.run, name="redis-writes")
            if http is not None:
                await tg.start(server.serve, name="http")
            if isinstance(broker, Reclaiming):
                tg.start_soon(broker.keep_claimed, name="stream-heartbeat")
                broker.on_listening = consuming
            tg.start_soon(beat, name="worker-presence")
            tg.start_soon(notifier.watchdog, status_line, name="watchdog")

            async def on_signals() -> None:
                first_at = 0.0
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        if finish.is_set():
                            if anyio.current_time() - first_at < REPEAT_AFTER:
                                # The same stop asked again: a supervisor's death can send its
                                # parent-death SIGTERM once per thread it loses (prctl(2)).
                                continue
                            log.warning("worker_cancelling_runs")
                            if isinstance(broker, Reclaiming):
                                broker.withhold_acks = True  # the runs stay in the stream
                            tg.cancel_scope.cancel()
                            return
                        log.info("worker_stopping", shutdown_timeout=settings.shutdown_timeout)
                        notifier.stopping(status_line())
                        first_at = anyio.current_time()
                        finish.set()

            tg.start_soon(on_signals, name="signals")
            freeze_heap()  # as the daemon does: start-up objects out of the collector's way
            log.info(
                "worker_ready",
                queue=redact_url(settings.queue.broker),
                pipelines=sorted(project.pipelines),
                worker=who,
            )
            if not isinstance(broker, Reclaiming):
                consuming()
            async with anyio.create_task_group() as runs:
                while True:
                    try:
                        await consumer.consume(finish, runs)
                        break
                    except Exception as exc:  # e.g. Redis went away: listen again
                        log.warning("worker_listen_failed", error=str(exc), retry_in_s=1.0)
                        consumed.clear()  # /readyz: 503 until the stream is read again
                        if isinstance(broker, Reclaiming):
                            broker.on_listening = consuming
                        await anyio.sleep(1.0)
                        if not isinstance(broker, Reclaiming):
                            consuming()
                with anyio.move_on_after(settings.shutdown_timeout):
                    await consumer.drained()
                # Past shutdown_timeout: cancel what still runs while the ledger is open (its
                # start is withdrawn; unacked, the run is reclaimed by another worker).
                if consumer.in_flight:
                    log.warning("worker_runs_cancelled_at_deadline", runs=consumer.in_flight)
                    if isinstance(broker, Reclaiming):
                        broker.withhold_acks = True
                    runs.cancel_scope.cancel()
            log.info(
                "worker_runs_done",
                runs=executor.done,
                redis_round_trips=batch.round_trips,
                redis_writes=batch.writes,
            )
            beating.cancel()
            with anyio.move_on_after(5):
                await presence.leave(who)
            with anyio.move_on_after(5):
                await link.flush()
            link.stop()
            with anyio.move_on_after(10):
                await link.wait_closed()
            tg.cancel_scope.cancel()
    finally:
        pool.shutdown(wait=False)  # a run abandoned at the deadline must not hold up the exit
        notifier.close()
        await shielded(broker.shutdown)
