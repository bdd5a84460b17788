"""The link's intake: received messages, their manual acks, and the bound on unacked ones.

A QoS 1/2 message is acked only when the caller says so (after its run is
enqueued or finished), so a crash means redelivery, never loss; unacked
messages hold the broker's in-flight window (MQTT v5 Receive Maximum), which
is our backpressure. A broker that sends more than that anyway (Mosquitto
2.0.11 sends a whole Receive Maximum per PUBACK) meets a second bound: with
``max_held`` unacked messages received, the link stops reading its socket
(TCP backpressure) until acks bring the count down to half of that (not just
below it: a link that resumed at one below paused again at the next message,
a pause and a resume per message under load, with two epoll changes each).
Paused, it cannot read the PUBACKs of its own publishes either, so a link
that pauses must not be the one the results go out on: the daemon publishes
them on a second link.

Each connection has a generation; a message carries the one it came on, and
its ack is void once that connection is gone (the broker sends it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import NamedTuple

import anyio
import structlog

from .client import Acker, Client, IncomingMessage, hold_reading, paho_ack, socket_of

__all__ = ["Intake"]

log = structlog.get_logger("flowerpower_daemon.mqtt")

_LOG_EVERY = 60.0  # s between pauses logged at INFO (the others at DEBUG; all counted)


class _Paused(NamedTuple):
    """A socket not being read: the event loop's reader, kept to be put back."""

    fd: int
    callback: Callable[..., object]
    args: tuple[object, ...]
    since: float


class Intake:
    """Received messages in order, with acks bound to their connection; pauses at ``max_held``.

    Called from paho's reader callback (:meth:`deliverer`), outside any task,
    and read by one consumer (:meth:`messages`).
    """

    def __init__(self, max_held: int | None, keepalive: float) -> None:
        # Received messages with their connection's generation; ``None`` ends the stream.
        # Unbounded: paho's callback cannot wait. What bounds it is what bounded aiomqtt's
        # own (unbounded) queue before: the broker's in-flight window and ``max_held``.
        # An asyncio queue, not an anyio stream: paho calls us from a reader callback,
        # outside any task, where anyio cannot always tell which event loop runs (with
        # sniffio installed it looks for a current task, and finds none).
        self._inbox: asyncio.Queue[tuple[IncomingMessage, int] | None] = asyncio.Queue()
        self._closed = False
        self._generation = 0  # counts connections
        self.live = 0  # the generation of the open connection, 0 between connections
        #: The subscribed connection (the one a pause applies to), ``None`` between them.
        self.client: Client | None = None
        #: QoS 1/2 messages received on this connection and not acked yet.
        self.held = 0
        #: QoS 1/2 messages received since the start, on any connection.
        self.received = 0
        self.max_held = max_held
        # Paused at max_held, reading again at this many (see the module doc).
        self.resume_at = max_held // 2 if max_held is not None else 0
        self.pauses = 0
        self._logged_at = -math.inf  # loop time of the last pause logged at INFO
        self._logged_pauses = 0
        #: QoS 1/2 messages dropped unhandled because their connection ended first.
        self.stale = 0
        self._keepalive = keepalive
        self._paused: _Paused | None = None
        self._busy = 0  # operations waiting for the broker's answer: never paused then

    def connecting(self) -> int:
        """A new connection's generation; from now on it is the live one."""
        self._generation += 1
        self.live = self._generation
        return self.live

    def lost(self) -> None:
        """The connection ended: its messages still waiting are dropped (they come again)."""
        self.client = None
        self.live = 0
        self._paused = None  # the socket is gone; its reader with it
        self.held = 0  # unacked messages of that connection come again

    def close(self) -> None:
        """End :meth:`messages` once what is already received has been read."""
        if not self._closed:
            self._closed = True
            self._inbox.put_nowait(None)

    def deliverer(self, client: Client, generation: int) -> Callable[[IncomingMessage], None]:
        """What ``client``'s messages are handed to: queued, counted, paused at the bound."""
        send = self._inbox.put_nowait
        max_held = self.max_held

        def deliver(incoming: IncomingMessage) -> None:
            if self._closed:
                return  # stopping: unacked, so the broker sends it again
            send((incoming, generation))
            if incoming.qos > 0:
                self.held += 1
                self.received += 1
                if (
                    max_held is not None
                    and self.held >= max_held
                    and not self._busy
                    and self.client is client
                ):
                    self._pause(client)

        return deliver

    def acker(self, client: Client, generation: int) -> Acker:
        """``acker(mid, qos)``: the ack of one message of ``client``'s connection."""
        ack_now = paho_ack(client)

        def acker(mid: int, qos: int) -> Callable[[], Awaitable[None]]:
            async def ack() -> None:
                # A message of an earlier connection is redelivered by the broker; its mid
                # is void.
                if qos > 0 and generation == self.live:
                    ack_now(mid, qos)
                    self.held -= 1
                    if self._paused is not None and self.held <= self.resume_at:
                        self._resume()

            return ack

        return acker

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        """Received messages, one at a time; those of a connection already gone are skipped."""
        inbox = self._inbox
        while True:
            try:
                # A message already waiting is taken without creating a coroutine.
                item = inbox.get_nowait()
            except asyncio.QueueEmpty:
                item = await inbox.get()
            if item is None:
                inbox.put_nowait(None)  # closed: so for every later reader too
                return
            message, generation = item
            if message.qos and generation != self.live:
                # Its connection is gone: it cannot be acked, and the broker sends it again.
                self.stale += 1
                continue
            yield message

    def _pause(self, client: Client) -> None:
        """Stop reading the socket (its reader is kept to be put back by :meth:`_resume`)."""
        if self._paused is not None:
            return
        sock = socket_of(client)
        loop = asyncio.get_running_loop()
        if sock is None or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            return
        fd = sock.fileno()
        try:
            reader = loop._selector.get_key(fd).data[0]  # type: ignore[attr-defined]
        except (KeyError, ValueError):
            return
        if reader is None:
            return
        # Taken before remove_reader, which cancels the handle (and clears these).
        # The loop's clock, as anyio.current_time() (which needs a task: see _inbox).
        self._paused = _Paused(fd, reader._callback, reader._args, loop.time())
        loop.remove_reader(fd)
        hold_reading(client, True)
        self.pauses += 1
        # A burst pauses many times a second: at INFO once a minute at most, with the count.
        now = self._paused.since
        if now - self._logged_at >= _LOG_EVERY:
            log.info(
                "mqtt_intake_paused",
                held=self.held,
                max_held=self.max_held,
                pauses_since_last_logged=self.pauses - self._logged_pauses,
                pauses=self.pauses,
            )
            self._logged_at, self._logged_pauses = now, self.pauses
        else:
            log.debug("mqtt_intake_paused", held=self.held, max_held=self.max_held)

    def _resume(self) -> None:
        paused, self._paused = self._paused, None
        client = self.client
        if paused is None or client is None:
            return
        sock = socket_of(client)
        if sock is None or sock.fileno() != paused.fd:
            return  # the connection went away meanwhile; the next one reads afresh
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(paused.fd, paused.callback, *paused.args)
        except (OSError, ValueError):
            return
        if hold_reading(client, False):  # read ahead already: the kernel will not say so
            loop.call_soon(paused.callback, *paused.args)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Keep reading the socket while a subscribe or publish waits for the broker's
        answer (a paused socket would never see it); pause again afterwards if due."""
        self._busy += 1
        self._resume()
        try:
            yield
        finally:
            self._busy -= 1
            client = self.client
            if (
                not self._busy
                and client is not None
                and self.max_held is not None
                and self.held >= self.max_held
            ):
                self._pause(client)

    async def keep_alive_while_paused(self) -> None:
        """Read now and then while paused: paho drops a connection it hears nothing from
        for a keepalive (runs slower than that would otherwise cost a reconnect)."""
        every = max(1.0, self._keepalive / 3)
        while True:
            await anyio.sleep(every)
            paused = self._paused
            if paused is not None and anyio.current_time() - paused.since >= every:
                # Read for a moment (the PINGRESP may sit behind messages): the broker
                # sends new messages only as we ack, so this drains a bounded amount.
                with self.reading():
                    await anyio.sleep(1.0)
