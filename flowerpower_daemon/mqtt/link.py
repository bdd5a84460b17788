"""The daemon's MQTT connection: subscribe, receive with manual acks, publish, reconnect.

- Persistent session (fixed client id, clean start off, session expiry) and
  manual acknowledgement: a QoS 1/2 message is acked only when the caller
  says so, and the unacked ones are bounded (:mod:`.intake`).
- Reconnects with capped, jittered backoff; results published while the
  broker is unreachable wait in a bounded outbox (:mod:`.outbox`, on disk in
  the state directory when the daemon passes one) and go out after the next
  connect, oldest first. A connected publish never touches the disk.
- A retained status topic says ``online``; the last will says ``offline``. The topic
  is the daemon's own (``mqtt.status_topic`` with its ``{client_id}``).
- Leaving for good (:meth:`leave`, then :meth:`stop` with ``end_session``):
  unsubscribe, take what the broker still sends, then end the session, so
  the broker keeps no share of a shared subscription for a daemon that is
  not coming back.
- Each disconnect or failed connect is logged once (``mqtt_disconnected``):
  a link that has a *companion* (the daemon's results link beside its
  receiving one, both on the same broker) leaves reporting a broker-wide
  outage to the companion and logs its own failures at debug level, except
  repeated ones while the companion is connected.

The MQTT client itself (aiomqtt / paho) is used through :mod:`.client` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import orjson
import structlog
from anyio.abc import TaskStatus

from ..retry import Backoff
from ..settings import MqttSettings
from .client import (
    Client,
    IncomingMessage,
    MqttError,
    disconnected,
    end_session,
    new_client,
    on_messages,
    publish_properties,
    publish_raw,
    request_reply,
)
from .intake import Intake
from .outbox import Outbox, OutgoingMessage

__all__ = [
    "IncomingMessage",
    "MqttLink",
    "OutgoingMessage",
    "request_reply",
    "status_payload_factory",
]

log = structlog.get_logger("flowerpower_daemon.mqtt")

_DRAIN_BATCH = 200  # outbox messages read per query while draining


class MqttLink:
    """Owns the connection; :meth:`run` is started in the daemon's task group."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        receive_maximum: int = 16,
        status_payload: Callable[[str], bytes] | None = None,
        client_id: str | None = None,
        outbox: Outbox | None = None,
        max_held: int | None = None,
        companion: MqttLink | None = None,
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.receive_maximum = max(1, min(65535, receive_maximum))
        self._status_payload = status_payload
        self._client_id = client_id or settings.client_id
        self._companion = companion
        self._client: Client | None = None
        self._intake = Intake(max_held, settings.keepalive)
        self._pausable = max_held is not None
        self._v5 = settings.protocol == "5"
        self._connected = anyio.Event()
        self._stopping = anyio.Event()
        self._end_session = False
        self._stop_scope: anyio.CancelScope | None = None
        self._closed = anyio.Event()
        self._online = False
        self._drained = anyio.Event()
        # Without one from the caller: in memory, same bound (nothing survives a restart).
        self._outbox = outbox if outbox is not None else Outbox(None, max_size=settings.outbox_size)
        self._owns_outbox = outbox is None
        self._drain_lock = anyio.Lock()
        self.connects = 0
        self._next_connect = anyio.Event()  # set (and replaced) at every connect
        self.published = 0
        self._inflight: set[asyncio.Future[None]] = set()  # publishes awaiting their PUBACK

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def max_held(self) -> int | None:
        return self._intake.max_held

    @property
    def held(self) -> int:
        """QoS 1/2 messages received on this connection and not acked yet."""
        return self._intake.held

    @property
    def pauses(self) -> int:
        """How often the intake bound stopped reading the socket."""
        return self._intake.pauses

    @property
    def stale(self) -> int:
        """QoS 1/2 messages dropped unhandled because their connection ended first."""
        return self._intake.stale

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    @property
    def dropped_outbox(self) -> int:
        """Results dropped because the outbox was full (oldest first) or not writable."""
        return self._outbox.dropped + self._outbox.failed

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def _make_client(self, generation: int) -> Client:
        payload = self._status_payload
        client = new_client(
            self.settings,
            client_id=self._client_id,
            receive_maximum=self.receive_maximum,
            will_payload=payload("offline") if payload is not None else None,
        )
        intake = self._intake
        on_messages(
            client,
            v5=self._v5,
            acker=intake.acker(client, generation),
            deliver=intake.deliverer(client, generation),
        )
        return client

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """The intake keeps reading while we wait for the broker's answer (see there)."""
        return self._intake.reading()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, pump messages, reconnect; returns after :meth:`stop`."""
        async with anyio.create_task_group() as tg:
            if self._pausable:
                tg.start_soon(self._intake.keep_alive_while_paused)
            await self._connections(task_status)
            tg.cancel_scope.cancel()

    async def _connections(self, task_status: TaskStatus[None]) -> None:
        backoff = Backoff(self.settings.reconnect_min, 2.0, 0.5, self.settings.reconnect_max)
        failures = 0
        started = False
        while not self._stopping.is_set():
            client = self._make_client(self._intake.connecting())
            try:
                async with client:
                    failures = 0
                    await self._on_connect(client)
                    if not started:
                        started = True
                        task_status.started()
                    try:
                        with anyio.CancelScope() as scope:
                            self._stop_scope = scope
                            if self._stopping.is_set():  # stop() came during the connect
                                scope.cancel()
                            await self._wait_disconnected(client)
                    except anyio.get_cancelled_exc_class():
                        # Torn down without stop() (a second signal's grace ran out):
                        # aiomqtt's exit disconnects cleanly, so no will; say `offline`.
                        self._stopping.set()
                        await self._say_offline(client, wait=2)
                        raise
                    await self._say_offline(client)
                    if self._end_session:  # set by stop() only
                        await self._end(client)
            except MqttError as exc:
                failures += 1
                delay = backoff.delay(failures)
                self._log_failure(exc, failures, delay)
            finally:
                self._fail_inflight()
                self._client = None
                self._intake.lost()
                self._connected = anyio.Event()
            if not started:
                started = True
                task_status.started()
            if self._stopping.is_set():
                break
            if failures:
                with anyio.move_on_after(delay):
                    await self._stopping.wait()
        self._close_inbox()
        if self._owns_outbox:
            await self._outbox.aclose()
        self._closed.set()

    def _log_failure(self, exc: MqttError, failures: int, delay: float) -> None:
        """``mqtt_disconnected``, once per outage and attempt: see the module doc."""
        companion = self._companion
        own = companion is None or (failures > 1 and companion.connected)
        (log.warning if own else log.debug)(
            "mqtt_disconnected",
            error=str(exc),
            retry_in_s=round(delay, 2),
            broker=f"{self.settings.host}:{self.settings.port}",
            client_id=self._client_id,
        )

    def _close_inbox(self) -> None:
        """End :meth:`messages` once what is already received has been read."""
        self._intake.close()

    async def next_connect(self) -> None:
        """Wait for the link's next (re)connect, its subscriptions and status sent."""
        await self._next_connect.wait()

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has said ``offline`` and disconnected (callers bound it)."""
        await self._closed.wait()

    async def _on_connect(self, client: Client) -> None:
        self.connects += 1
        with self._reading():
            for topic, qos in self.subscriptions:
                await client.subscribe(topic, qos=qos)
            if self._online:
                await self._publish_status(client)
            self._client = self._intake.client = client
        self._connected.set()
        self._next_connect.set()
        self._next_connect = anyio.Event()
        log.info(
            "mqtt_connected",
            broker=f"{self.settings.host}:{self.settings.port}",
            subscriptions=[t for t, _ in self.subscriptions],
        )
        await self._drain(client)

    async def _drain(self, client: Client) -> None:
        """Send what waits in the outbox, oldest first; a failure leaves the rest for later."""
        async with self._drain_lock:
            sent_total = 0
            last = 0
            while True:
                batch = await self._outbox.peek(_DRAIN_BATCH, after=last)
                if not batch:
                    break
                sent: list[int] = []
                try:
                    for row_id, msg in batch:
                        await self._publish_now(client, msg)
                        sent.append(row_id)
                        last = row_id
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._outbox.remove(sent)
                    sent_total += len(sent)
            if sent_total:
                log.info("mqtt_outbox_sent", sent=sent_total, waiting=len(self._outbox))
            self._drained.set()

    async def _publish_status(self, client: Client) -> None:
        if self.settings.status_topic and self._status_payload is not None:
            with self._reading():
                await client.publish(
                    self.settings.own_status_topic,
                    self._status_payload("online"),
                    qos=1,
                    retain=True,
                )

    @property
    def online(self) -> bool:
        """:meth:`announce_online` was called: the daemon says ``online`` at each connect."""
        return self._online

    async def announce_online(self) -> None:
        """Say ``online`` (retained) now and after every reconnect: the daemon is ready.

        Called again (after a reload), it says it again: the status names the pipelines."""
        self._online = True
        client = self._client
        if client is not None:
            try:
                await self._publish_status(client)
            except MqttError as exc:
                log.warning("mqtt_status_publish_failed", error=str(exc))

    async def _wait_disconnected(self, client: Client) -> None:
        """Until the connection ends (messages arrive through the intake meanwhile)."""
        gone = disconnected(client)
        await asyncio.wait((gone,))  # not ``await gone``: cancelling that would cancel it
        self._fail_inflight()
        raise MqttError("Disconnected") from gone.exception()

    def _fail_inflight(self) -> None:
        """Publishes waiting for a PUBACK that can no longer come fail now (not at a timeout)."""
        inflight, self._inflight = self._inflight, set()
        for fut in inflight:
            if not fut.done():
                fut.set_exception(MqttError("Disconnected before the broker confirmed"))

    async def set_subscriptions(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        """Replace the subscriptions (reload): apply now if connected, keep for reconnects."""
        old = dict(self.subscriptions)
        new = dict(subscriptions)
        self.subscriptions = list(new.items())
        client = self._client
        if client is None:
            return  # the next connect subscribes to the new list
        gone = [topic for topic in old if topic not in new]
        with self._reading():
            if gone:
                await client.unsubscribe(gone)
            for topic, qos in new.items():
                if old.get(topic) != qos:
                    await client.subscribe(topic, qos=qos)

    def messages(self) -> AsyncIterator[IncomingMessage]:
        """Received messages, one at a time (the bound is the unacked count: :mod:`.intake`)."""
        return self._intake.messages()

    async def publish(self, msg: OutgoingMessage) -> bool:
        """Publish now, or queue in the outbox while disconnected. True if sent now."""
        client = self._client
        if client is not None:
            try:
                await self._publish_now(client, msg)
                return True
            except MqttError as exc:
                log.warning("mqtt_publish_failed", topic=msg.topic, error=str(exc))
        # Queued only once written (a thread hop; the connected path above never gets here).
        await self._outbox.put(msg)
        now = self._client
        if now is not None and now is not client:
            # Connected meanwhile, maybe after the connect's drain looked: send it now.
            try:
                await self._drain(now)
            except MqttError as exc:
                log.warning("mqtt_outbox_send_failed", error=str(exc))
        return False

    async def _publish_now(self, client: Client, msg: OutgoingMessage) -> None:
        props = None
        if self._v5 and (
            msg.correlation_data is not None or msg.response_topic or msg.user_properties
        ):
            props = publish_properties(
                msg.correlation_data, msg.response_topic, msg.user_properties
            )
        # Only a link that may pause must keep reading for this publish's PUBACK.
        if self._pausable:
            with self._intake.reading():
                await publish_raw(
                    client, msg.topic, msg.payload, msg.qos, msg.retain, props, self._inflight
                )
        else:  # the results' link: no context manager per result
            await publish_raw(
                client, msg.topic, msg.payload, msg.qos, msg.retain, props, self._inflight
            )
        self.published += 1

    async def _say_offline(self, client: Client, wait: float = 5) -> None:
        """The retained ``offline``; cleared instead when leaving for good (a fleet's view
        then lists no member that is not coming back)."""
        if self._stopping.is_set() and self.settings.status_topic and self._status_payload:
            payload = b"" if self._end_session else self._status_payload("offline")
            with anyio.move_on_after(wait, shield=True), self._reading():
                await client.publish(
                    self.settings.own_status_topic, payload, qos=1, retain=True
                )

    async def _end(self, client: Client) -> None:
        """Disconnect dropping the broker's session (MQTT v5; a 3.1.1 session stays, with
        no subscriptions after :meth:`leave`, so nothing is queued for it)."""
        if not self._v5:
            return
        with anyio.move_on_after(5, shield=True), self._reading():
            await end_session(client)
        log.info("mqtt_session_ended", client_id=self._client_id)

    async def leave(self, quiet: float = 1.0) -> bool:
        """Unsubscribe from every topic, then go on taking what the broker still sends
        (messages it had queued for this session) until none has come for ``quiet`` s and
        every received one is acked. True once done; False when not connected (the
        broker keeps the subscriptions until the session expires). Callers bound it.

        For a daemon leaving a shared subscription for good: its share of new messages
        goes to the other members from the UNSUBACK on, instead of waiting in its
        session for a return that will not come."""
        topics = [topic for topic, _ in self.subscriptions]
        self.subscriptions = []  # a reconnect meanwhile subscribes to nothing
        client = self._client
        if client is None:
            return False
        if topics:
            try:
                with self._reading():
                    await client.unsubscribe(topics)
            except MqttError as exc:
                log.warning("mqtt_unsubscribe_failed", topics=topics, error=str(exc))
                return False
        log.info("mqtt_unsubscribed", topics=topics, held=self._intake.held)
        intake = self._intake
        mark = intake.received
        while True:
            await anyio.sleep(quiet)
            if intake.held == 0 and intake.received == mark:
                return True
            mark = intake.received

    async def flush(self) -> None:
        """Wait until the outbox is empty, e.g. before shutting down (callers bound it).

        Returns at once while disconnected with an outbox on disk: its messages
        wait there for the next start, so shutting down need not wait for the broker.
        """
        if self._client is None and self._outbox.path is not None:
            return
        while self._outbox and not self._stopping.is_set():
            self._drained = anyio.Event()
            await self._drained.wait()

    def stop(self, *, end_session: bool = False) -> None:
        """Publish ``offline``, disconnect and make :meth:`run` return; with
        ``end_session``, the broker drops this client's session (see :meth:`leave`)."""
        self._end_session = end_session
        self._stopping.set()
        if self._stop_scope is not None:
            self._stop_scope.cancel()


def status_payload_factory(
    version: str, pipelines: Sequence[str] | Callable[[], Sequence[str]], client_id: str
) -> Callable[[str], bytes]:
    """The retained status message: ``{"status": "online", "version": ..., "pipelines": [...],
    "client_id": ..., "host": ..., "pid": ...}`` (host and pid tell a fleet's daemons apart).

    ``pipelines`` may be a callable, asked at each message, so that a status said after a
    reload (or the last will's ``offline``) names the pipelines the daemon has then."""
    host, pid = socket.gethostname(), os.getpid()

    def make(state: str) -> bytes:
        return orjson.dumps(
            {
                "status": state,
                "version": version,
                "pipelines": list(pipelines() if callable(pipelines) else pipelines),
                "client_id": client_id,
                "host": host,
                "pid": pid,
            }
        )

    return make
