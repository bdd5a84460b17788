"""``flowerpower-daemon worker --processes N``: N worker processes under one parent.

See :func:`supervise`. Apart from :mod:`.worker` (what each child runs) so that
the supervision can change without touching the worker.

No child outlives its supervisor: the supervisor stops every child it
started when it fails (a child that cannot be spawned, any error), and each
child asks for SIGTERM when the parent dies however it dies, SIGKILL
included (:func:`die_with_parent`; under systemd the unit's cgroup does the
same).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
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

#: Tells a child its supervisor's pid: the child stops when that process dies.
PARENT_ENV = "FLOWERPOWER_SUPERVISOR_PID"
_CHILD = (
    "import sys; from flowerpower_daemon.service.supervisor import die_with_parent; "
    "die_with_parent(); from flowerpower_daemon.cli import main; sys.exit(main())"
)
_MAX_BACKOFF = 30.0
#: prctl(2)'s option: a signal for this process when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1
#: Seconds between two looks at the parent where prctl is not available.
_PARENT_POLL = 1.0


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

    When the supervisor itself fails (a child cannot be spawned, an error of
    its own), it stops every child it started (SIGTERM, SIGKILL after
    ``shutdown_timeout`` and a margin), prints one ``error:`` line and exits 1.
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
    supervisor = Supervisor(command, processes, grace=settings.shutdown_timeout + 5)
    try:
        return anyio.run(supervisor.run)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the children are stopped already (Supervisor.run)
        print_error(f"worker --processes {processes}: {_reason(exc)}")
        return 1


def _reason(exc: BaseException) -> str:
    """The first real error inside (possibly nested) exception groups, as one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def die_with_parent() -> None:
    """In a child of :class:`Supervisor`: get SIGTERM (a worker's graceful stop) when
    the supervisor dies, however it dies; exit now if it died already.

    Linux: ``prctl(PR_SET_PDEATHSIG)``, the kernel signals at the parent's death;
    elsewhere a thread watches the parent pid. A process started otherwise (no
    :data:`PARENT_ENV`) is left alone.
    """
    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return
    parent = int(value)
    if not _pdeathsig(signal.SIGTERM):
        threading.Thread(
            target=_watch_parent, args=(parent,), name="parent-watch", daemon=True
        ).start()
    if os.getppid() != parent:  # it died before the signal was asked for
        raise SystemExit(0)


def _pdeathsig(sig: signal.Signals) -> bool:
    """Ask the kernel for ``sig`` when the parent dies; whether it was granted."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """SIGTERM to this process once ``parent`` is no longer its parent (it died)."""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL)
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs ``processes`` copies of ``command``; see :func:`supervise`."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        notifier: Notifier | None = None,
        *,
        grace: float = 35.0,
    ) -> None:
        self.command = list(command)
        self.processes = processes
        self.notifier = notifier or Notifier()
        #: Seconds a child gets to stop after SIGTERM when the supervisor fails.
        self.grace = grace
        self.stop = anyio.Event()
        self.children: dict[int, anyio.abc.Process] = {}
        self.ready: set[int] = set()
        self.failed = False

    def status_line(self) -> str:
        return f"{len(self.ready)}/{self.processes} worker processes consuming"

    async def run(self) -> int:
        """Supervise until every child stopped; on any error (or cancellation) stop the
        children still running first, then let it propagate."""
        try:
            with tempfile.TemporaryDirectory(prefix="flowerpower-workers-") as tmp:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._signals, name="signals")
                    tg.start_soon(self.notifier.watchdog, self.status_line, name="watchdog")
                    async with anyio.create_task_group() as slots:
                        for index in range(self.processes):
                            await slots.start(self._slot, index, Path(tmp), name=f"worker-{index}")
                    tg.cancel_scope.cancel()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop_children(_reason(exc))
            raise
        finally:
            self.notifier.close()
        log.info("workers_stopped", failed=self.failed)
        return 1 if self.failed else 0

    async def _stop_children(self, reason: str) -> None:
        """SIGTERM every running child, SIGKILL those still there after ``grace`` s."""
        procs = [p for p in self.children.values() if p.returncode is None]
        if not procs:
            return
        log.error("workers_stopping_after_error", error=reason, processes=len(procs))
        for proc in procs:
            _send(proc, signal.SIGTERM)
        with anyio.move_on_after(self.grace):
            for proc in procs:
                await proc.wait()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        with anyio.move_on_after(5):
            for proc in procs:
                await proc.wait()
        self.children.clear()

    async def _spawn(self, env: dict[str, str]) -> anyio.abc.Process:
        """One child (its own session: a terminal's Ctrl-C reaches it through us)."""
        return await anyio.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=env,
            start_new_session=True,
        )

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
        env[PARENT_ENV] = str(os.getpid())
        if self.notifier.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.notifier.watchdog_usec)
        backoff = 1.0
        async with await anyio.create_unix_datagram_socket(local_path=path) as sock:
            task_status.started()
            while not self.stop.is_set():
                began = time.monotonic()
                proc = await self._spawn(env)
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
