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
and another worker reclaims it. A second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import anyio
import structlog

from ..errors import ConfigError, ConfigProblem
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..redact import redact_url
from ..settings import Settings
from ..state.history import history_for
from .lifecycle import freeze_heap, shielded

__all__ = ["run_worker"]

log = structlog.get_logger("flowerpower_daemon.worker")


async def run_worker(settings: Settings) -> None:
    """``flowerpower-daemon worker``: execute runs from the Redis stream and publish results."""
    from taskiq.acks import AcknowledgeType
    from taskiq.receiver import Receiver

    from ..mqtt.link import MqttLink
    from ..mqtt.sinks import MqttResultSink
    from ..queue.broker import RunExecutor, RunLedger, create_broker, register_run_task
    from ..queue.streams import ReclaimingStreamBroker
    from ..queue.threads import ElasticThreadPool
    from ..state.dedup import RedisDedupStore, dedup_prefix

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
    sink = MqttResultSink(
        link,
        qos=settings.mqtt.result_qos,
        max_bytes=settings.mqtt.max_result_bytes,
        result_store=settings.mqtt.result_store,
    )
    broker = create_broker(settings.queue, worker=True)
    broker.is_worker_process = True
    history = history_for(settings)  # Redis: the daemon's `flowerpowerctl jobs` sees these runs

    async def record(request: RunRequest, result: RunResult) -> None:
        await history.record(result)

    queue = settings.queue
    # Shared with every daemon and worker: dedup keys (claimed here, as runs start) and
    # the starts of unfinished runs (so that a reclaimed run knows its lost attempts).
    dedup = RedisDedupStore(queue.redis, dedup_prefix(queue))
    ledger = RunLedger(queue.redis, f"{queue.queue_name}:started")
    executor = RunExecutor(
        project.runner,
        sink,
        on_result=record,
        dedup=dedup,
        claim_ttls={t.name: t.dedup_ttl for t in settings.triggers},
        ledger=ledger,
        max_deliveries=queue.max_deliveries,
        track_running=True,
    )
    register_run_task(broker, executor)
    # As in the daemon: sync pipelines in a pool that grows only while runs are stuck.
    pool = ElasticThreadPool(queue.worker_concurrency)
    project.runner.executor = pool
    await broker.startup()
    # Set at the first signal: the receiver takes no new run and waits for the running ones.
    finish = asyncio.Event()
    try:
        async with history, dedup, ledger, anyio.create_task_group() as tg:
            await tg.start(link.run, name="mqtt-link")
            if isinstance(broker, ReclaimingStreamBroker):
                tg.start_soon(broker.keep_claimed, name="stream-heartbeat")

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        if finish.is_set():
                            log.warning("worker_cancelling_runs")
                            if isinstance(broker, ReclaimingStreamBroker):
                                broker.withhold_acks = True  # the runs stay in the stream
                            tg.cancel_scope.cancel()
                            return
                        log.info("worker_stopping", shutdown_timeout=settings.shutdown_timeout)
                        finish.set()

            tg.start_soon(on_signals, name="signals")
            freeze_heap()  # as the daemon does: start-up objects out of the collector's way
            log.info(
                "worker_ready",
                queue=redact_url(settings.queue.broker),
                pipelines=sorted(project.pipelines),
            )
            # taskiq's receiver (the loop of ``taskiq worker``), with its own graceful stop;
            # the pool is for sync tasks, which this worker has none of.
            with ThreadPoolExecutor(max_workers=1) as sync_tasks:
                while True:
                    receiver = Receiver(
                        broker,
                        executor=sync_tasks,
                        run_startup=False,
                        max_async_tasks=settings.queue.worker_concurrency,
                        ack_type=AcknowledgeType.WHEN_SAVED,
                        wait_tasks_timeout=settings.shutdown_timeout,
                    )
                    try:
                        await receiver.listen(finish)
                        break
                    except Exception as exc:  # e.g. Redis went away: listen again
                        log.warning("worker_listen_failed", error=str(exc), retry_in_s=1.0)
                        await anyio.sleep(1.0)
            # Past shutdown_timeout: cancel what still runs while the ledger is open (its
            # start is withdrawn; unacked, the run is reclaimed by another worker).
            leftover = [t for t in executor.running if not t.done()]
            if leftover:
                log.warning("worker_runs_cancelled_at_deadline", runs=len(leftover))
                if isinstance(broker, ReclaimingStreamBroker):
                    broker.withhold_acks = True
                for t in leftover:
                    t.cancel()
                with anyio.move_on_after(10):
                    await asyncio.gather(*leftover, return_exceptions=True)
            log.info("worker_runs_done")
            with anyio.move_on_after(5):
                await link.flush()
            link.stop()
            with anyio.move_on_after(10):
                await link.wait_closed()
            tg.cancel_scope.cancel()
    finally:
        pool.shutdown(wait=False)  # a run abandoned at the deadline must not hold up the exit
        await shielded(broker.shutdown)
