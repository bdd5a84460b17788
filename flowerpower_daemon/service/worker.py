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

Under systemd (``Type=notify``) it says ``READY=1`` once it consumes from the
stream, pings ``WATCHDOG=1`` from its event loop and says ``STOPPING=1`` when
it begins to drain. Every few seconds it records itself in Redis (name
``<hostname>:<pid>``, runs in flight, runs done, last seen) for the daemon's
``status``; it leaves the listing when it stops.

``--processes N`` (:func:`supervise`) runs N such workers under one parent;
see there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import structlog

from ..errors import ConfigError, ConfigProblem
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..redact import redact_url
from ..settings import Settings
from ..state.history import history_for
from .lifecycle import freeze_heap, process_settings, shielded
from .systemd import Notifier

__all__ = ["run_worker", "supervise"]

#: Seconds between two records of a worker in the live workers' listing.
BEAT_EVERY = 2.0

log = structlog.get_logger("flowerpower_daemon.worker")


async def run_worker(settings: Settings) -> None:
    """``flowerpower-daemon worker``: execute runs from the Redis stream and publish results."""
    from taskiq.acks import AcknowledgeType
    from taskiq.receiver import Receiver

    from ..mqtt.link import MqttLink
    from ..mqtt.sinks import MqttResultSink
    from ..queue.broker import (
        RunExecutor,
        RunLedger,
        create_broker,
        register_run_task,
        worker_name,
    )
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
    sink = MqttResultSink(
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

    async def record(request: RunRequest, result: RunResult) -> None:
        await history.record(result)

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
        track_running=True,
        who=who,
        first_delivery=broker.first_delivery if isinstance(broker, Reclaiming) else None,
    )
    register_run_task(broker, executor)
    # As in the daemon: sync pipelines in a pool that grows only while runs are stuck.
    pool = ElasticThreadPool(queue.worker_concurrency)
    project.runner.executor = pool
    await broker.startup()
    # Set at the first signal: the receiver takes no new run and waits for the running ones.
    finish = asyncio.Event()
    started_at = datetime.now(UTC).isoformat()

    def status_line() -> str:
        running = sum(1 for t in executor.running if not t.done())
        return f"{running} running, {executor.done} done"

    beating = anyio.CancelScope()  # cancelled before the worker leaves the listing

    async def beat() -> None:
        with beating:
            while True:
                await presence.beat(
                    who,
                    in_flight=sum(1 for t in executor.running if not t.done()),
                    done=executor.done,
                    concurrency=queue.worker_concurrency,
                    started_at=started_at,
                )
                await anyio.sleep(BEAT_EVERY)

    def consuming() -> None:
        log.info("worker_consuming", consumer=getattr(broker, "consumer_name", who))
        notifier.ready(status_line())

    try:
        async with history, dedup, ledger, presence, batch, anyio.create_task_group() as tg:
            await tg.start(link.run, name="mqtt-link")
            await tg.start(batch.run, name="redis-writes")
            if isinstance(broker, Reclaiming):
                tg.start_soon(broker.keep_claimed, name="stream-heartbeat")
                broker.on_listening = consuming
            tg.start_soon(beat, name="worker-presence")
            tg.start_soon(notifier.watchdog, status_line, name="watchdog")

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        if finish.is_set():
                            log.warning("worker_cancelling_runs")
                            if isinstance(broker, Reclaiming):
                                broker.withhold_acks = True  # the runs stay in the stream
                            tg.cancel_scope.cancel()
                            return
                        log.info("worker_stopping", shutdown_timeout=settings.shutdown_timeout)
                        notifier.stopping(status_line())
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
            # taskiq's receiver (the loop of ``taskiq worker``), with its own graceful stop;
            # the pool is for sync tasks, which this worker has none of.
            with ThreadPoolExecutor(max_workers=1) as sync_tasks:
                while True:
                    # validate_params=False: the task reads its argument itself
                    # (RunRequest.from_dict); taskiq would try to make a pydantic model
                    # of its annotation, InProcessRequest | Mapping, and log a warning
                    # with a traceback for every run.
                    receiver = Receiver(
                        broker,
                        executor=sync_tasks,
                        validate_params=False,
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
                if isinstance(broker, Reclaiming):
                    broker.withhold_acks = True
                for t in leftover:
                    t.cancel()
                with anyio.move_on_after(10):
                    await asyncio.gather(*leftover, return_exceptions=True)
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


# ------------------------------------------------------------ --processes N

_CHILD = "import sys; from flowerpower_daemon.cli import main; sys.exit(main())"
_MAX_BACKOFF = 30.0


def supervise(config: str | None, log_level: str | None, processes: int) -> int:
    """``flowerpower-daemon worker --processes N``: N worker processes under this one.

    The parent validates the config, starts the children (each a plain
    ``worker``, in a session of its own so that a terminal's Ctrl-C reaches
    them once, through the parent), forwards SIGTERM/SIGINT to them, restarts
    one that exits while nobody asked it to stop (after 1 s, doubling up to
    30 s; back to 1 s once a child ran a minute), and exits when every child
    has stopped: 0 when each exited 0. Each child speaks sd_notify to a socket
    of the parent's: the parent tells systemd ``READY=1`` once every child
    consumes, ``STOPPING=1`` at the first signal, pings ``WATCHDOG=1`` from its
    own loop and kills a ready child that missed a whole watchdog period.
    """
    from ..logs import print_error

    settings = process_settings(config, log_level)
    if settings is None:
        return 2
    if not settings.queue.is_redis:
        print_error("queue.broker: a worker needs queue.broker: redis://...")
        return 2
    command = [sys.executable, "-c", _CHILD]
    if log_level:
        command.append(f"--log-level={log_level}")
    command.append("worker")
    if config:
        command += ["--config", config]
    try:
        return anyio.run(Supervisor(command, processes).run)
    except KeyboardInterrupt:
        return 130


class Supervisor:
    """Runs ``processes`` copies of ``command``; see :func:`supervise`."""

    def __init__(
        self, command: Sequence[str], processes: int, notifier: Notifier | None = None
    ) -> None:
        self.command = list(command)
        self.processes = processes
        self.notifier = notifier or Notifier()
        self.stop = anyio.Event()
        self.children: dict[int, anyio.abc.Process] = {}
        self.ready: set[int] = set()
        self.failed = False

    def status_line(self) -> str:
        return f"{len(self.ready)}/{self.processes} worker processes consuming"

    async def run(self) -> int:
        with tempfile.TemporaryDirectory(prefix="flowerpower-workers-") as tmp:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, name="signals")
                tg.start_soon(self.notifier.watchdog, self.status_line, name="watchdog")
                async with anyio.create_task_group() as slots:
                    for index in range(self.processes):
                        await slots.start(self._slot, index, Path(tmp), name=f"worker-{index}")
                tg.cancel_scope.cancel()
        self.notifier.close()
        log.info("workers_stopped", failed=self.failed)
        return 1 if self.failed else 0

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                if not self.stop.is_set():
                    log.info("workers_stopping", processes=len(self.children))
                    self.notifier.stopping(self.status_line())
                    self.stop.set()
                for proc in list(self.children.values()):  # a second signal: at once
                    _send(proc, sig)

    async def _slot(
        self, index: int, tmp: Path, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """One child after the other in this slot, until the stop."""
        path = tmp / f"{index}.sock"
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "WATCHDOG_USEC")}
        env["NOTIFY_SOCKET"] = str(path)
        if self.notifier.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.notifier.watchdog_usec)
        backoff = 1.0
        async with await anyio.create_unix_datagram_socket(local_path=path) as sock:
            task_status.started()
            while not self.stop.is_set():
                began = time.monotonic()
                proc = await anyio.open_process(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=None,
                    stderr=None,
                    env=env,
                    start_new_session=True,
                )
                self.children[index] = proc
                log.info("worker_process_started", slot=index, child_pid=proc.pid)
                if self.stop.is_set():
                    _send(proc, signal.SIGTERM)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._listen, index, sock, proc, name=f"worker-{index}-notify")
                    code = await proc.wait()
                    tg.cancel_scope.cancel()
                del self.children[index]
                self.ready.discard(index)
                if self.stop.is_set():
                    self.failed |= code != 0
                    log.info("worker_process_stopped", slot=index, child_pid=proc.pid, code=code)
                    return
                if time.monotonic() - began > 60:
                    backoff = 1.0
                log.error(
                    "worker_process_died",
                    slot=index,
                    child_pid=proc.pid,
                    code=code,
                    restart_in_s=backoff,
                )
                with anyio.move_on_after(backoff):
                    await self.stop.wait()
                backoff = min(2 * backoff, _MAX_BACKOFF)

    async def _listen(
        self, index: int, sock: anyio.abc.UNIXDatagramSocket, proc: anyio.abc.Process
    ) -> None:
        """A child's sd_notify messages: READY counts, silence past the watchdog kills."""
        usec = self.notifier.watchdog_usec
        period = usec / 1_000_000 if usec is not None else float("inf")
        while True:
            with anyio.move_on_after(period) as scope:
                data, _ = await sock.receive()
            if scope.cancelled_caught:
                if index in self.ready:
                    log.error("worker_process_watchdog", slot=index, child_pid=proc.pid)
                    proc.kill()
                continue
            lines = data.decode(errors="replace").splitlines()
            if "READY=1" in lines and index not in self.ready:
                self.ready.add(index)
                if len(self.ready) == self.processes and not self.stop.is_set():
                    self.notifier.ready(self.status_line())


def _send(proc: anyio.abc.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass  # it exited meanwhile
