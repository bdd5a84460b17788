"""sd_notify without a dependency: datagrams to ``$NOTIFY_SOCKET``.

The daemon tells systemd ``READY=1`` once MQTT subscriptions are active and
timers are armed, ``RELOADING=1`` (with ``MONOTONIC_USEC``) then ``READY=1``
around a reload, ``STOPPING=1`` when it begins a graceful shutdown, and
``STATUS=...`` with its counters. With ``WatchdogSec=`` in the unit, systemd
sets ``WATCHDOG_USEC`` and :meth:`Notifier.watchdog` sends ``WATCHDOG=1``
from the event loop at half that period, so a blocked loop misses its
deadline and systemd restarts the service. Without ``$NOTIFY_SOCKET``
(not under systemd, or ``Type=simple``) every call does nothing.

Sends never block: the socket is non-blocking and a full receive queue just
drops the datagram (systemd reads its notify socket promptly).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import anyio
import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("flowerpower_daemon.systemd")


class Notifier:
    """Speaks sd_notify to the socket in ``env`` (``os.environ`` by default)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        self.address = address
        self.watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True when it was sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:  # no listener, queue full: never fatal
            log.debug("sd_notify_failed", error=str(exc), message=assignments[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    async def watchdog(self, status: Callable[[], str] | None = None) -> None:
        """Ping ``WATCHDOG=1`` (plus ``STATUS=``) every half watchdog period, forever.

        Returns at once when there is no watchdog. Runs as a task of the
        daemon's root task group: if the event loop stalls, the ping is late.
        """
        if self.address is None or self.watchdog_usec is None:
            return
        period = self.watchdog_usec / 2_000_000
        while True:
            self.notify("WATCHDOG=1", *_status(status() if status else None))
            await anyio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={text.replace(chr(10), ' ')}",)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` when it is meant for this process (``WATCHDOG_PID`` unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None
