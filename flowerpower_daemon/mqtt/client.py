"""The one module that uses aiomqtt and paho: an upgrade of either touches this file.

What the link (:mod:`.link`) and its intake bound (:mod:`.intake`) need from
an MQTT client, in our terms: make a client with manual acks and our socket
options, hand its received messages over as :class:`IncomingMessage`, ack one,
publish without aiomqtt's per-message cost, and the client's socket and
end-of-connection future. Where that needs aiomqtt's private attributes
(its paho client, ``_disconnected``, ``_pending_publishes``), it is here
only.

- ``TCP_NODELAY`` on the socket: without it a QoS 1 round trip costs ~88 ms
  (Nagle + delayed ACK), with it ~0.4 ms.
- paho's MQTT v5 ``Properties`` are made cheap to create
  (:func:`_share_property_tables`), once, at import.
- What paho queues for sending goes out on the loop's next turn
  (:func:`_write_on_the_loop`), not after a wait for the socket to be writable.
- paho's per-packet debug log calls end at once unless its logger takes DEBUG
  (:func:`_skip_debug_logs`).
- paho reads a plain TCP socket 16 KiB at a time (:class:`_ReadAhead`), not
  with three ``recv`` calls per packet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import aiomqtt
import anyio
import orjson
import structlog
from aiomqtt import Client, MqttError
from paho.mqtt import client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..settings import MqttSettings

__all__ = [
    "PUBLISH_TIMEOUT",
    "Acker",
    "Client",
    "IncomingMessage",
    "MqttError",
    "Properties",
    "disconnected",
    "end_session",
    "hold_reading",
    "new_client",
    "on_messages",
    "paho_ack",
    "publish_properties",
    "publish_raw",
    "request_reply",
    "retained_messages",
    "socket_of",
]

log = structlog.get_logger("flowerpower_daemon.mqtt")

PUBLISH_TIMEOUT = 10.0  # seconds a connected publish waits for the broker's PUBACK

_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

Acker = Callable[[int, int], Callable[[], Awaitable[None]]]
"""``acker(mid, qos)``: the :attr:`IncomingMessage.ack` of one received message."""


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
    attributes = frozenset(name.replace(" ", "") for name in probe["names"])

    def __init__(self: Properties, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def clear(self: Properties) -> None:
        state = vars(self)
        if len(state) > 1:  # any property set besides packetType (most often none)
            for name in attributes.intersection(state):
                del state[name]

    for key in tables:
        setattr(Properties, key, probe[key])
    __init__._shared_tables = True  # type: ignore[attr-defined]
    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    return True


_share_property_tables()


def new_client(
    s: MqttSettings,
    *,
    client_id: str,
    receive_maximum: int,
    will_payload: bytes | None,
) -> Client:
    """A client for ``s``'s broker with manual acks (a message is acked only when told)."""
    will = None
    if s.status_topic and will_payload is not None:
        will = aiomqtt.Will(s.own_status_topic, will_payload, qos=1, retain=True)
    props = None
    clean_start: paho_mqtt.CleanStartOption = paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY
    clean_session: bool | None = None
    if s.protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if s.clean_start else s.session_expiry
        props.ReceiveMaximum = receive_maximum
        clean_start = s.clean_start
        protocol = aiomqtt.ProtocolVersion.V5
    else:
        clean_session = s.clean_start
        protocol = aiomqtt.ProtocolVersion.V311
    tls_params = None
    tls_insecure = None  # aiomqtt's defaults where the keyword is not ours to set
    if s.use_tls:
        tls = s.tls
        tls_params = aiomqtt.TLSParameters(
            ca_certs=tls.ca_file if tls else None,
            certfile=tls.cert_file if tls else None,
            keyfile=tls.key_file if tls else None,
            cert_reqs=ssl.CERT_NONE if tls and tls.insecure else ssl.CERT_REQUIRED,
        )
        tls_insecure = bool(tls and tls.insecure)
    client = Client(
        s.host,
        s.port,
        identifier=client_id,
        username=s.username,
        password=s.password,
        protocol=protocol,
        will=will,
        clean_start=clean_start,
        clean_session=clean_session,
        keepalive=s.keepalive,
        properties=props,
        tls_params=tls_params,
        tls_insecure=tls_insecure,
        socket_options=_NODELAY,
        max_inflight_messages=receive_maximum,
        timeout=10,
    )
    client._client.manual_ack_set(True)
    _read_ahead(client)
    _write_on_the_loop(client)
    _skip_debug_logs(client)
    return client


def _skip_debug_logs(client: Client) -> None:
    """paho logs every packet in and out at DEBUG, four calls per message, each ~1.4 us
    through ``Logger.log`` even when the level drops it. Unless aiomqtt's logger takes
    DEBUG when the client is made (a client per connection: a reload that turns DEBUG
    on shows them from the next connection), those calls end at once; paho's
    warnings and errors are logged as before."""
    if client._logger.isEnabledFor(logging.DEBUG):
        return
    paho = client._client
    easy_log = paho._easy_log
    debug = paho_mqtt.MQTT_LOG_DEBUG

    def _easy_log(level: int, fmt: str, *args: object) -> None:
        if level != debug:
            easy_log(level, fmt, *args)  # type: ignore[arg-type]

    paho._easy_log = _easy_log  # type: ignore[method-assign]


class _ReadAhead:
    """A plain TCP socket as paho reads it, filled 16 KiB at a time.

    paho reads each packet with three ``recv`` calls (its first byte, its
    length, the rest) and then one more that fails with ``EAGAIN`` (an
    exception raised and caught): four system calls for every PUBLISH or
    PUBACK, most of a small message's read cost. This reads whatever the
    kernel holds in one call and serves paho's small reads from it. Bytes
    it holds are not the kernel's, so the event loop does not see them as
    readable: :meth:`pending` tells aiomqtt's reader, which reads on while
    it is above 0 (as for TLS sockets, whose buffer is OpenSSL's), and
    :func:`hold_reading` makes it 0 while the intake bound pauses the socket.

    aiomqtt's reader handles everything read ahead in one call, without
    giving the event loop a turn, so the buffer is kept small: 16 KiB is
    about 150 small messages (a few ms of handling), one ``recv`` for all.
    """

    SIZE = 16384

    __slots__ = ("_buf", "_pos", "_sock", "close", "fileno", "held", "send")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        #: Set while the intake bound pauses reading: then nothing is pending.
        self.held = False
        self.send = sock.send
        self.fileno = sock.fileno
        self.close = sock.close

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if not buf:
            data = self._sock.recv(max(bufsize, self.SIZE))  # raises BlockingIOError if none
            if len(data) <= bufsize:
                return data
            buf = self._buf = data
        end = pos + bufsize
        if end >= len(buf):
            self._buf = b""
            self._pos = 0
            return buf[pos:] if pos else buf
        self._pos = end
        return buf[pos:end]

    def pending(self) -> int:
        """Bytes read from the kernel and not yet by paho (0 while held)."""
        return 0 if self.held else len(self._buf) - self._pos

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _read_ahead(client: Client) -> None:
    """Give paho each new plain TCP socket as a :class:`_ReadAhead` (TLS and websocket
    connections are left as they are: OpenSSL already reads ahead)."""
    paho = client._client
    aiomqtt_open = paho.on_socket_open

    def socket_open(paho_client: paho_mqtt.Client, userdata: object, sock: object) -> None:
        # paho has just set ``_sock`` to ``sock`` and reads it through that attribute only
        if type(sock) is socket.socket and paho_client._sock is sock:
            paho_client._sock = _ReadAhead(sock)  # type: ignore[assignment,arg-type]
        if aiomqtt_open is not None:
            aiomqtt_open(paho_client, userdata, sock)  # type: ignore[arg-type]

    paho.on_socket_open = socket_open


def hold_reading(client: Client, held: bool) -> int:
    """Tell ``client``'s reader that reading is paused (``held``) or not; then its
    :meth:`_ReadAhead.pending` bytes (a resumed reader must be called for them: the
    kernel has them no more, so the event loop will not)."""
    sock = client._client._sock
    if not isinstance(sock, _ReadAhead):
        return 0
    sock.held = held
    return sock.pending()


def _write_on_the_loop(client: Client) -> None:
    """Send what paho queues (results, acks) on the loop's next turn, with no writer.

    paho says "I have something to write" through ``on_socket_register_write``;
    aiomqtt answers by adding a writer for the socket through
    ``call_soon_threadsafe`` (a byte through the loop's self-pipe: a send and a
    recv), then an ``epoll_ctl`` to add the writer, an ``epoll_wait`` that
    reports the socket writable (an idle TCP socket always is) and an
    ``epoll_ctl`` to remove it: five system calls around each batch of sends.
    Called on the loop's own thread, this instead calls paho's ``loop_write``
    on the loop's next turn (``call_soon``: what one turn queued goes out
    together); only when the socket's buffer is full does it wait for the
    socket with a writer, until paho has sent everything (paho's unregister
    call, still aiomqtt's, removes it). A call from another thread (aiomqtt
    connects from an executor thread) goes to aiomqtt's own handler.
    """
    paho = client._client
    loop = client._loop
    loop_thread = threading.get_ident()  # a client is made on its loop's thread
    aiomqtt_register = paho.on_socket_register_write
    scheduled = False

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        try:
            paho.loop_write()
        except Exception as exc:  # as aiomqtt's writer does: the connection is broken
            if not client._disconnected.done():
                client._disconnected.set_exception(exc)
            return
        if paho.want_write():  # the socket's buffer is full: send the rest when it drains
            sock = socket_of(client)
            if sock is not None:
                loop.add_writer(sock.fileno(), flush)

    def register_write(paho_client: paho_mqtt.Client, userdata: object, sock: object) -> None:
        nonlocal scheduled
        if threading.get_ident() != loop_thread:
            if aiomqtt_register is not None:
                aiomqtt_register(paho_client, userdata, sock)  # type: ignore[arg-type]
            return
        if not scheduled:
            scheduled = True
            loop.call_soon(flush)

    paho.on_socket_register_write = register_write


def on_messages(
    client: Client, *, v5: bool, acker: Acker, deliver: Callable[[IncomingMessage], None]
) -> None:
    """Hand each message ``client`` receives to ``deliver``, with its ack from ``acker``.

    Straight from paho's callback: aiomqtt's own queue and iterator cost a
    task and an asyncio.wait per message, and a pump to copy it. A message
    that cannot be decoded (e.g. a topic that is not UTF-8) can never be
    handled: it is logged and acked.
    """
    ack_now = paho_ack(client)

    def on_message(paho: object, userdata: object, message: paho_mqtt.MQTTMessage) -> None:
        try:
            payload = message.payload
            if not isinstance(payload, bytes):
                payload = bytes(payload)
            qos = message.qos
            props = message.properties if v5 else None
            if props is None:
                incoming = IncomingMessage(
                    message.topic, payload, qos, bool(message.retain), ack=acker(message.mid, qos)
                )
            else:
                incoming = IncomingMessage(
                    message.topic,
                    payload,
                    qos,
                    bool(message.retain),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation_data=getattr(props, "CorrelationData", None),
                    user_properties=tuple(getattr(props, "UserProperty", None) or ()),
                    ack=acker(message.mid, qos),
                )
        except Exception as exc:
            log.error("mqtt_message_undecodable", error=repr(exc), mid=message.mid)
            if message.qos > 0:
                ack_now(message.mid, message.qos)
            return
        deliver(incoming)

    client._client.on_message = on_message


def paho_ack(client: Client) -> Callable[[int, int], object]:
    """``ack(mid, qos)`` on ``client``'s connection (manual acks: see :func:`new_client`)."""
    return client._client.ack


def socket_of(client: Client) -> socket.socket | None:
    """``client``'s socket while it has one (the intake bound pauses reading it)."""
    sock = client._client.socket()
    if isinstance(sock, _ReadAhead):
        return sock._sock
    return sock if isinstance(sock, socket.socket) else None


def disconnected(client: Client) -> asyncio.Future[None]:
    """Done when ``client``'s connection ends (never cancel it: aiomqtt owns it)."""
    return client._disconnected


async def end_session(client: Client) -> None:
    """Disconnect ``client`` telling the broker to drop its session now (MQTT v5: DISCONNECT
    with a Session Expiry Interval of 0), not keep it for ``mqtt.session_expiry``; waits for
    the connection to end (aiomqtt's exit then has nothing left to do). Callers bound it."""
    props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client._client.disconnect(properties=props)
    gone = disconnected(client)
    await asyncio.wait((gone,))  # not ``await gone``: cancelling that would cancel it


def publish_properties(
    correlation_data: bytes | None,
    response_topic: str | None,
    user_properties: tuple[tuple[str, str], ...],
) -> Properties:
    """MQTT v5 PUBLISH properties for a result (call it only when one of them is set)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if response_topic:
        props.ResponseTopic = response_topic
    if user_properties:
        props.UserProperty = list(user_properties)
    return props


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
        fut.set_exception(MqttError("Operation timed out"))


async def publish_raw(
    client: Client,
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    props: Properties | None,
    inflight: set[asyncio.Future[None]],
) -> None:
    """aiomqtt's ``publish``, without what it costs per message on the results' path.

    aiomqtt waits for the PUBACK with ``asyncio.wait_for`` on an Event (a task per
    publish) and lists every pending call to warn about how many there are. Here
    one future per publish, resolved by aiomqtt's own ``on_publish`` (it calls
    ``.set()`` on what ``_pending_publishes`` holds), kept in ``inflight`` while
    it waits (the caller fails those when the connection ends), failed after
    ``PUBLISH_TIMEOUT``.
    """
    info = client._client.publish(topic, payload, qos, retain, props)
    if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
    if info.is_published():
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    pending = cast("dict[int, _Confirmation]", client._pending_publishes)
    pending[info.mid] = _Confirmation(fut)
    inflight.add(fut)
    timer = loop.call_later(PUBLISH_TIMEOUT, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()
        inflight.discard(fut)
        pending.pop(info.mid, None)


def new_reply_topic() -> str:
    """A fresh topic for one request's reply."""
    return f"flowerpower/replies/{uuid.uuid4().hex}"


async def request_reply(
    url: str,
    topic: str,
    payload: Mapping[str, object],
    *,
    protocol: str = "3.1.1",
    reply_to: str | None = None,
) -> bytes:
    """Publish ``payload`` with a ``reply_to`` topic (fresh unless given) and return the first
    reply (bound it).

    Works with MQTT 3.1.1 brokers (the embedded one) because the reply target
    travels in the JSON payload, not in MQTT v5 properties.
    """
    parts = urlsplit(url)
    reply_to = reply_to or new_reply_topic()
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    async with Client(
        parts.hostname or "127.0.0.1", parts.port or 1883, protocol=version, socket_options=_NODELAY
    ) as client:
        await client.subscribe(reply_to, qos=1)
        await client.publish(topic, orjson.dumps({**payload, "reply_to": reply_to}), qos=1)
        async for message in client.messages:
            data = message.payload
            return data if isinstance(data, bytes) else str(data).encode()
    raise TimeoutError(f"no reply on {reply_to}")


async def retained_messages(s: MqttSettings, topic_filter: str, wait: float) -> dict[str, bytes]:
    """The retained messages on ``topic_filter`` (topic -> payload), collected for ``wait`` s.

    A short-lived connection of its own (clean start, no session left on the
    broker, a fresh client id), so the caller's link and its intake are not
    touched. Connecting is bounded by the client's timeout; callers bound the whole.
    """
    clean = s.model_copy(update={"clean_start": True})
    client = new_client(
        clean,
        client_id=f"{s.client_id}-fleet-{uuid.uuid4().hex[:8]}",
        receive_maximum=65535,
        will_payload=None,
    )
    found: dict[str, bytes] = {}
    async with client:
        await client.subscribe(topic_filter, qos=0)
        with anyio.move_on_after(wait):
            async for message in client.messages:
                if not message.retain:
                    continue
                data = message.payload
                found[str(message.topic)] = data if isinstance(data, bytes) else str(data).encode()
    return found
