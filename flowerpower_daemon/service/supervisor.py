"""``flowerpower-daemon worker --processes N``: N worker processes under one parent.

See :func:`supervise`. Apart from :mod:`.worker` (what each child runs) so that
the supervision can change without touching the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc
import structlog

from .lifecycle import process_settings
from .systemd import Notifier

__all__ = ["Supervisor", "supervise"]

log = structlog.get_logger("flowerpower_daemon.worker")

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
