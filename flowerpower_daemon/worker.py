"""``flowerpower-daemon worker``: runs taken from the Redis stream, results published.

A worker runs no triggers: it executes the requests the daemons enqueue
(``queue.broker: redis://...``), publishes each result on MQTT like the
daemon would, records it in the shared Redis history, and shares dedup keys
and the run-start ledger with every other daemon and worker (see dedup.py
and queue.py). SIGTERM/SIGINT stop it after flushing its outbox (bounded).
"""

from __future__ import annotations

import os
import signal
import socket

import anyio
import structlog

from .daemon import _shielded
from .errors import ConfigError, ConfigProblem
from .history import history_for
from .project.api import FlowerPowerProject
from .project.models import RunRequest, RunResult
from .settings import Settings

__all__ = ["run_worker"]

log = structlog.get_logger("flowerpower_daemon.worker")


async def run_worker(settings: Settings) -> None:
    """``flowerpower-daemon worker``: execute runs from the Redis stream and publish results."""
    from taskiq.acks import AcknowledgeType
    from taskiq.api import run_receiver_task

    from .dedup import RedisDedupStore, dedup_prefix
    from .mqtt import MqttLink
    from .queue import RunExecutor, RunLedger, create_broker, register_run_task
    from .results import MqttResultSink
    from .streams import ReclaimingStreamBroker

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
        link, qos=settings.mqtt.result_qos, max_bytes=settings.mqtt.max_result_bytes
    )
    broker = create_broker(settings.queue, worker=True)
    broker.is_worker_process = True
    history = history_for(settings)  # Redis: the daemon's `flowerpowerctl jobs` sees these runs

    async def record(request: RunRequest, result: RunResult) -> None:
        await history.record(result)

    queue = settings.queue
    # Shared with every daemon and worker: dedup keys (claimed here, as runs start) and
    # the starts of unfinished runs (so that a reclaimed run knows its lost attempts).
    dedup = RedisDedupStore(queue.broker, dedup_prefix(queue))
    ledger = RunLedger(queue.broker, f"{queue.queue_name}:started")
    executor = RunExecutor(
        project.runner,
        sink,
        on_result=record,
        dedup=dedup,
        claim_ttls={t.name: t.dedup_ttl for t in settings.triggers},
        ledger=ledger,
        max_deliveries=queue.max_deliveries,
    )
    register_run_task(broker, executor)
    await broker.startup()
    try:
        async with history, dedup, ledger, anyio.create_task_group() as tg:
            await tg.start(link.run, name="mqtt-link")
            if isinstance(broker, ReclaimingStreamBroker):
                tg.start_soon(broker.keep_claimed, name="stream-heartbeat")

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        log.info("worker_stopping")
                        with anyio.move_on_after(5):
                            await link.flush()
                        link.stop()
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal, name="signals")
            log.info(
                "worker_ready", queue=settings.queue.broker, pipelines=sorted(project.pipelines)
            )
            await run_receiver_task(
                broker,
                max_async_tasks=settings.queue.worker_concurrency,
                ack_time=AcknowledgeType.WHEN_SAVED,
                run_startup=False,
            )
    finally:
        await _shielded(broker.shutdown)
