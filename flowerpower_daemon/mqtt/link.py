"""The daemon's one MQTT connection: subscribe, receive with manual acks, publish, reconnect.

The only module that uses aiomqtt / paho, so an upgrade touches one file.

- ``TCP_NODELAY`` on the socket: without it a QoS 1 round trip costs ~88 ms
  (Nagle + delayed ACK), with it ~0.4 ms.
- Persistent session (fixed client id, clean start off, session expiry) and
  manual acknowledgement: a QoS 1/2 message is acked only when the caller
  says so (after its run is enqueued or finished), so a crash means
  redelivery, never loss; unacked messages hold the broker's in-flight
  window (MQTT v5 Receive Maximum), which is our backpressure. A broker
  that sends more than that anyway (Mosquitto 2.0.11 sends a whole Receive
  Maximum per PUBACK) meets a second bound: with ``max_held`` unacked
  messages received, the link stops reading its socket (TCP backpressure)
  until acks bring the count down to half of that (not just below it: a link
  that resumed at one below paused again at the next message, a pause and a
  resume per message under load, with two epoll changes each). Paused, it
  cannot read the PUBACKs of its own publishes either, so a link that pauses
  must not be the one the results go out on: the daemon publishes them on a
  second link.
- Reconnects with capped, jittered backoff; results published while the
  broker is unreachable wait in a bounded outbox (:mod:`.outbox`, on disk in
  the state directory when the daemon passes one) and go out after the next
  connect, oldest first. A connected publish never touches the disk.
- A retained status topic says ``online``; the last will says ``offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import anyio
import orjson
import structlog
from anyio.abc import TaskStatus
from paho.mqtt import client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..retry import Backoff
from ..settings import MqttSettings
from .outbox import Outbox, OutgoingMessage

__all__ = ["IncomingMessage", "MqttLink", "OutgoingMessage"]

log = structlog.get_logger("flowerpower_daemon.mqtt")

_DRAIN_BATCH = 200  # outbox messages read per query while draining

_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A received message; call :attr:`ack` once it is safely handled."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    ack: Callable[[], Awaitable[None]] = field(default=lambda: _noop(), compare=False, repr=False)


async def _noop() -> None:
    return None


def _share_property_tables() -> bool:
    """Make paho's MQTT v5 ``Properties`` cheap to create; True once done.

    paho builds the same three lookup tables (27 property names, their types
    and packet types) in every ``Properties()``, and ``clear()`` (called by
    every ``unpack``) re-derives the 27 attribute names: three times per
    message on the daemon's path (incoming PUBLISH, result PUBLISH, PUBACK),
    ~6% of its event loop's time. The tables are constant and only ever read,
    so they move to the class, built once. Applied only when a paho instance
    looks exactly as this was written against (paho-mqtt 2.x); otherwise
    paho is left alone.
    """
    if getattr(Properties.__init__, "_shared_tables", False):
        return True
    tables = ("types", "names", "properties")
    probe = vars(Properties(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]
    other = vars(Properties(PacketTypes.CONNACK))  # type: ignore[no-untyped-call]
    if set(probe) != {"packetType", *tables} or any(probe[k] != other[k] for k in tables):
        return False
    attributes = tuple(name.replace(" ", "") for name in probe["names"])

    def __init__(self: Properties, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def clear(self: Properties) -> None:
        state = vars(self)
        for name in attributes:
            state.pop(name, None)

    for key in tables:
        setattr(Properties, key, probe[key])
    __init__._shared_tables = True  # type: ignore[attr-defined]
    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    return True


_share_property_tables()


PUBLISH_TIMEOUT = 10.0  # seconds a connected publish waits for the broker's PUBACK


class _Confirmation:
    """What aiomqtt's ``on_publish`` resolves (it calls ``set()``, as on an Event)."""

    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future[None]) -> None:
        self.fut = fut

    def set(self) -> None:
        if not self.fut.done():
            self.fut.set_result(None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(aiomqtt.MqttError("Operation timed out"))


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
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.receive_maximum = max(1, min(65535, receive_maximum))
        self._status_payload = status_payload
        self._client_id = client_id or settings.client_id
        self._client: aiomqtt.Client | None = None
        self._generation = 0  # counts connections; a message carries the one it came on
        self._live = 0  # the generation of the open connection, 0 between connections
        self._connected = anyio.Event()
        self._stopping = anyio.Event()
        self._closed = anyio.Event()
        self._online = False
        self._drained = anyio.Event()
        # Without one from the caller: in memory, same bound (nothing survives a restart).
        self._outbox = outbox if outbox is not None else Outbox(None, max_size=settings.outbox_size)
        self._owns_outbox = outbox is None
        self._drain_lock = anyio.Lock()
        # Received messages with their connection's generation; ``None`` ends the stream.
        # Unbounded: paho's callback cannot wait. What bounds it is what bounded aiomqtt's
        # own (unbounded) queue before: the broker's in-flight window and ``max_held``.
        # An asyncio queue, not an anyio stream: paho calls us from a reader callback,
        # outside any task, where anyio cannot always tell which event loop runs (with
        # sniffio installed it looks for a current task, and finds none).
        self._inbox: asyncio.Queue[tuple[IncomingMessage, int] | None] = asyncio.Queue()
        self._inbox_closed = False
        self.connects = 0
        self.published = 0
        #: QoS 1/2 messages received on this connection and not acked yet.
        self.held = 0
        self.max_held = max_held
        # Paused at max_held, reading again at this many (see the module doc).
        self.resume_at = max_held // 2 if max_held is not None else 0
        self.pauses = 0
        #: QoS 1/2 messages dropped unhandled because their connection ended first.
        self.stale = 0
        self._paused: tuple[int, Any, tuple[Any, ...], float] | None = None
        self._busy = 0  # operations waiting for the broker's answer: never paused then
        self._inflight: set[asyncio.Future[None]] = set()  # publishes awaiting their PUBACK

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    @property
    def dropped_outbox(self) -> int:
        """Results dropped because the outbox was full (oldest first) or not writable."""
        return self._outbox.dropped + self._outbox.failed

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def _v5(self) -> bool:
        return self.settings.protocol == "5"

    def _make_client(self, generation: int) -> aiomqtt.Client:
        s = self.settings
        will = None
        if s.status_topic and self._status_payload is not None:
            will = aiomqtt.Will(s.status_topic, self._status_payload("offline"), qos=1, retain=True)
        props = None
        kwargs: dict[str, Any] = {}
        if self._v5():
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if s.clean_start else s.session_expiry
            props.ReceiveMaximum = self.receive_maximum
            kwargs["clean_start"] = s.clean_start
            protocol = aiomqtt.ProtocolVersion.V5
        else:
            kwargs["clean_session"] = s.clean_start
            protocol = aiomqtt.ProtocolVersion.V311
        tls_params = None
        if s.use_tls:
            tls = s.tls
            tls_params = aiomqtt.TLSParameters(
                ca_certs=tls.ca_file if tls else None,
                certfile=tls.cert_file if tls else None,
                keyfile=tls.key_file if tls else None,
                cert_reqs=ssl.CERT_NONE if tls and tls.insecure else ssl.CERT_REQUIRED,
            )
            kwargs["tls_insecure"] = bool(tls and tls.insecure)
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=self._client_id,
            username=s.username,
            password=s.password,
            protocol=protocol,
            will=will,
            keepalive=s.keepalive,
            properties=props,
            tls_params=tls_params,
            socket_options=_NODELAY,
            max_inflight_messages=self.receive_maximum,
            timeout=10,
            **kwargs,
        )
        # Manual acks: a message is acknowledged only when its run is safe (see module doc).
        client._client.manual_ack_set(True)
        max_held = self.max_held
        send = self._inbox.put_nowait
        v5 = self._v5()

        def on_message(paho: Any, userdata: Any, message: Any) -> None:
            # Straight from paho's callback to the consumer: aiomqtt's own queue and
            # iterator cost a task and an asyncio.wait per message, and a pump to copy it.
            try:
                incoming = self._incoming(client, generation, message, v5)
            except Exception as exc:  # e.g. a topic that is not UTF-8: it can never be handled
                log.error("mqtt_message_undecodable", error=repr(exc), mid=message.mid)
                if message.qos > 0:
                    client._client.ack(message.mid, message.qos)
                return
            if self._inbox_closed:
                return  # stopping: unacked, so the broker sends it again
            send((incoming, generation))
            if message.qos > 0:
                self.held += 1
                if (
                    max_held is not None
                    and self.held >= max_held
                    and not self._busy
                    and self._client is client
                ):
                    self._pause(client)

        client._client.on_message = on_message
        return client

    def _pause(self, client: aiomqtt.Client) -> None:
        """Stop reading the socket (its reader is kept to be put back by :meth:`_resume`)."""
        if self._paused is not None:
            return
        sock = client._client.socket()
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
        self._paused = (fd, reader._callback, reader._args, loop.time())
        loop.remove_reader(fd)
        self.pauses += 1
        log.info("mqtt_intake_paused", held=self.held, max_held=self.max_held)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Keep reading the socket while a subscribe or publish waits for the broker's
        answer (a paused socket would never see it); pause again afterwards if due."""
        self._busy += 1
        self._resume()
        try:
            yield
        finally:
            self._busy -= 1
            client = self._client
            if (
                not self._busy
                and client is not None
                and self.max_held is not None
                and self.held >= self.max_held
            ):
                self._pause(client)

    def _resume(self) -> None:
        paused, self._paused = self._paused, None
        client = self._client
        if paused is None or client is None:
            return
        fd, callback, args, _ = paused
        sock = client._client.socket()
        if sock is None or sock.fileno() != fd:
            return  # the connection went away meanwhile; the next one reads afresh
        try:
            asyncio.get_running_loop().add_reader(fd, callback, *args)
        except (OSError, ValueError):
            return

    async def _keep_alive_while_paused(self) -> None:
        """Read now and then while paused: paho drops a connection it hears nothing from
        for a keepalive (runs slower than that would otherwise cost a reconnect)."""
        every = max(1.0, self.settings.keepalive / 3)
        while True:
            await anyio.sleep(every)
            paused = self._paused
            if paused is not None and anyio.current_time() - paused[3] >= every:
                # Read for a moment (the PINGRESP may sit behind messages): the broker
                # sends new messages only as we ack, so this drains a bounded amount.
                with self._reading():
                    await anyio.sleep(1.0)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, pump messages, reconnect; returns after :meth:`stop`."""
        async with anyio.create_task_group() as tg:
            if self.max_held is not None:
                tg.start_soon(self._keep_alive_while_paused)
            await self._connections(task_status)
            tg.cancel_scope.cancel()

    async def _connections(self, task_status: TaskStatus[None]) -> None:
        backoff = Backoff(self.settings.reconnect_min, 2.0, 0.5, self.settings.reconnect_max)
        failures = 0
        started = False
        while not self._stopping.is_set():
            self._generation += 1
            generation = self._live = self._generation
            client = self._make_client(generation)
            try:
                async with client:
                    failures = 0
                    await self._on_connect(client)
                    if not started:
                        started = True
                        task_status.started()
                    with anyio.CancelScope() as scope:
                        self._stop_scope = scope
                        if self._stopping.is_set():  # stop() came during the connect
                            scope.cancel()
                        await self._wait_disconnected(client)
                    await self._say_offline(client)
            except aiomqtt.MqttError as exc:
                failures += 1
                delay = backoff.delay(failures)
                log.warning(
                    "mqtt_disconnected",
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                    broker=f"{self.settings.host}:{self.settings.port}",
                )
            finally:
                self._fail_inflight()
                self._client = None
                self._live = 0  # its messages still waiting are dropped: they come again
                self._connected = anyio.Event()
                self._paused = None  # the socket is gone; its reader with it
                self.held = 0  # unacked messages of that connection come again
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

    def _close_inbox(self) -> None:
        """End :meth:`messages` once what is already received has been read."""
        if not self._inbox_closed:
            self._inbox_closed = True
            self._inbox.put_nowait(None)

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has said ``offline`` and disconnected (callers bound it)."""
        await self._closed.wait()

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        self.connects += 1
        with self._reading():
            for topic, qos in self.subscriptions:
                await client.subscribe(topic, qos=qos)
            if self._online:
                await self._publish_status(client)
            self._client = client
        self._connected.set()
        log.info(
            "mqtt_connected",
            broker=f"{self.settings.host}:{self.settings.port}",
            subscriptions=[t for t, _ in self.subscriptions],
        )
        await self._drain(client)

    async def _drain(self, client: aiomqtt.Client) -> None:
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

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        if self.settings.status_topic and self._status_payload is not None:
            with self._reading():
                await client.publish(
                    self.settings.status_topic, self._status_payload("online"), qos=1, retain=True
                )

    async def announce_online(self) -> None:
        """Say ``online`` (retained) now and after every reconnect: the daemon is ready."""
        self._online = True
        client = self._client
        if client is not None:
            try:
                await self._publish_status(client)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt_status_publish_failed", error=str(exc))

    async def _wait_disconnected(self, client: aiomqtt.Client) -> None:
        """Until the connection ends (messages arrive through ``on_message`` meanwhile)."""
        gone = client._disconnected
        await asyncio.wait((gone,))  # not ``await gone``: cancelling that would cancel it
        self._fail_inflight()
        raise aiomqtt.MqttError("Disconnected") from gone.exception()

    def _fail_inflight(self) -> None:
        """Publishes waiting for a PUBACK that can no longer come fail now (not at a timeout)."""
        inflight, self._inflight = self._inflight, set()
        for fut in inflight:
            if not fut.done():
                fut.set_exception(aiomqtt.MqttError("Disconnected before the broker confirmed"))

    def _incoming(
        self, client: aiomqtt.Client, generation: int, message: Any, v5: bool
    ) -> IncomingMessage:
        """paho's message as ours, with an ack bound to the connection it came on."""
        props = message.properties if v5 else None
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        qos = message.qos
        if props is None:
            return IncomingMessage(
                message.topic,
                payload,
                qos,
                bool(message.retain),
                ack=self._acker(client, generation, message.mid, qos),
            )
        return IncomingMessage(
            message.topic,
            payload,
            qos,
            bool(message.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            user_properties=tuple(getattr(props, "UserProperty", None) or ()),
            ack=self._acker(client, generation, message.mid, qos),
        )

    def _acker(
        self, client: aiomqtt.Client, generation: int, mid: int, qos: int
    ) -> Callable[[], Awaitable[None]]:
        async def ack() -> None:
            # A message of an earlier connection is redelivered by the broker; its mid is void.
            if qos > 0 and generation == self._live:
                client._client.ack(mid, qos)
                self.held -= 1
                if self._paused is not None and self.held <= self.resume_at:
                    self._resume()

        return ack

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

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        """Received messages, one at a time (the bound is the unacked count: module doc)."""
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
            if message.qos and generation != self._live:
                # Its connection is gone: it cannot be acked, and the broker sends it again.
                self.stale += 1
                continue
            yield message

    async def publish(self, msg: OutgoingMessage) -> bool:
        """Publish now, or queue in the outbox while disconnected. True if sent now."""
        client = self._client
        if client is not None:
            try:
                await self._publish_now(client, msg)
                return True
            except aiomqtt.MqttError as exc:
                log.warning("mqtt_publish_failed", topic=msg.topic, error=str(exc))
        # Queued only once written (a thread hop; the connected path above never gets here).
        await self._outbox.put(msg)
        now = self._client
        if now is not None and now is not client:
            # Connected meanwhile, maybe after the connect's drain looked: send it now.
            try:
                await self._drain(now)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt_outbox_send_failed", error=str(exc))
        return False

    async def _publish_now(self, client: aiomqtt.Client, msg: OutgoingMessage) -> None:
        props = None
        if self._v5() and (
            msg.correlation_data is not None or msg.response_topic or msg.user_properties
        ):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if msg.correlation_data is not None:
                props.CorrelationData = msg.correlation_data
            if msg.response_topic:
                props.ResponseTopic = msg.response_topic
            if msg.user_properties:
                props.UserProperty = list(msg.user_properties)
        # Only a link that may pause must keep reading for this publish's PUBACK.
        reading = self._reading() if self.max_held is not None else contextlib.nullcontext()
        with reading:
            await self._publish_raw(client, msg.topic, msg.payload, msg.qos, msg.retain, props)
        self.published += 1

    async def _publish_raw(
        self,
        client: aiomqtt.Client,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: Properties | None,
    ) -> None:
        """aiomqtt's ``publish``, without what it costs per message on the results' path.

        aiomqtt waits for the PUBACK with ``asyncio.wait_for`` on an Event (a task per
        publish) and lists every pending call to warn about how many there are. Here
        one future per publish, resolved by aiomqtt's own ``on_publish`` (it calls
        ``.set()`` on what ``_pending_publishes`` holds), failed when the connection
        ends (:meth:`_wait_disconnected`) or after ``PUBLISH_TIMEOUT``.
        """
        info = client._client.publish(topic, payload, qos, retain, props)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        pending: dict[int, Any] = client._pending_publishes
        pending[info.mid] = _Confirmation(fut)
        inflight = self._inflight
        inflight.add(fut)
        timer = loop.call_later(PUBLISH_TIMEOUT, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            inflight.discard(fut)
            pending.pop(info.mid, None)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        if self._stopping.is_set() and self.settings.status_topic and self._status_payload:
            with anyio.move_on_after(5, shield=True), self._reading():
                await client.publish(
                    self.settings.status_topic, self._status_payload("offline"), qos=1, retain=True
                )

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

    def stop(self) -> None:
        """Publish ``offline``, disconnect and make :meth:`run` return."""
        self._stopping.set()
        scope = getattr(self, "_stop_scope", None)
        if scope is not None:
            scope.cancel()


def status_payload_factory(
    version: str, pipelines: Sequence[str], client_id: str
) -> Callable[[str], bytes]:
    """The retained status message: ``{"status": "online", "version": ..., "pipelines": [...]}``."""

    def make(state: str) -> bytes:
        return orjson.dumps(
            {
                "status": state,
                "version": version,
                "pipelines": list(pipelines),
                "client_id": client_id,
            }
        )

    return make


async def request_reply(
    url: str, topic: str, payload: dict[str, Any], *, protocol: str = "3.1.1"
) -> bytes:
    """Publish ``payload`` with a fresh ``reply_to`` topic and return the first reply (bound it).

    Works with MQTT 3.1.1 brokers (the embedded one) because the reply target
    travels in the JSON payload, not in MQTT v5 properties.
    """
    import uuid
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    reply_to = f"flowerpower/replies/{uuid.uuid4().hex}"
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        parts.hostname or "127.0.0.1", parts.port or 1883, protocol=version, socket_options=_NODELAY
    ) as client:
        await client.subscribe(reply_to, qos=1)
        await client.publish(topic, orjson.dumps({**payload, "reply_to": reply_to}), qos=1)
        async for message in client.messages:
            data = message.payload
            return data if isinstance(data, bytes) else str(data).encode()
    raise TimeoutError(f"no reply on {reply_to}")
