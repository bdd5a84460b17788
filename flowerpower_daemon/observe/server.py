"""A small HTTP/1.1 server on anyio streams: GET (and HEAD) of a few fixed paths.

Enough for Prometheus, a load balancer's health check and a browser, and no
more: one request per connection (``Connection: close``), a request head of
at most :data:`MAX_HEAD` bytes read within :data:`READ_TIMEOUT` seconds, at
most ``max_clients`` connections at once. When all are taken, the one that has
waited longest for its request head is dropped to make room, so clients that
connect and say nothing (or trickle bytes: slowloris) cannot lock Prometheus and
health checks out; only when every connection is already being answered is a
new one closed. An answer the client does not read within :data:`READ_TIMEOUT`
is given up. A bad
request gets 400, another method 405, an unknown path 404; a handler that
raises gets 500 and a log line. Nothing a client does ends the server, and
the server never ends its task group: an ``accept`` that fails (out of file
descriptors, say) is logged and tried again.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog
from anyio.abc import SocketAttribute

from ..errors import FlowerPowerError

__all__ = ["MAX_HEAD", "READ_TIMEOUT", "Handler", "HttpServer", "Response"]

log = structlog.get_logger("flowerpower_daemon.http")

#: Bytes of request line plus headers a client may send (no body is read).
MAX_HEAD = 8192
#: Seconds a client has to send its request head.
READ_TIMEOUT = 10.0

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Response]]


class HttpServer:
    """Serves ``routes`` (path -> handler) on ``address``: :meth:`bind`, then :meth:`serve`."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: Mapping[str, Handler],
        *,
        key: str = "http.listen",
        max_clients: int = 64,
    ) -> None:
        self.address = address
        self.routes = dict(routes)
        self.key = key
        self.max_clients = max_clients
        self.clients = 0
        self.requests = 0
        #: Connections dropped to make room for a newer one (see :meth:`_accept`).
        self.evicted = 0
        #: Connections still reading their request head, oldest first: the ones to drop.
        self._reading: dict[int, anyio.CancelScope] = {}
        self._next_id = 0
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._listeners: list[anyio.abc.SocketListener] = []

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose for port 0)."""
        return int(self._listeners[0].extra(SocketAttribute.local_port))

    async def bind(self) -> None:
        """Listen (before the daemon starts its tasks): a busy port or a bad host is a
        one-line :class:`FlowerPowerError` naming the key (``http.listen``, ``--http``)."""
        host, port = self.address
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise FlowerPowerError(
                f"{self.key}: cannot listen on {host}:{port}: {reason}"
            ) from None
        self._listener = listener
        self._listeners = [
            one for one in listener.listeners if isinstance(one, anyio.abc.SocketListener)
        ]
        log.info("http_listening", host=host, port=self.port, paths=sorted(self.routes))

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until cancelled (binds first unless :meth:`bind` did)."""
        if self._listener is None:
            await self.bind()
        assert self._listener is not None
        async with self._listener, anyio.create_task_group() as tg:
            for listener in self._listeners:
                tg.start_soon(self._accept, listener, tg)
            task_status.started()

    async def _accept(self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: not the daemon's end
                log.warning("http_accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            if self.clients >= self.max_clients:
                if not self._reading:  # every slot is answering a request: they end soon
                    await stream.aclose()
                    continue
                # Drop the client that has waited longest for its head (idle or trickling).
                oldest = next(iter(self._reading))
                self._reading.pop(oldest).cancel()
                self.evicted += 1
            self.clients += 1
            self._next_id += 1
            tg.start_soon(self._client, stream, self._next_id)

    async def _client(self, stream: anyio.abc.SocketStream, key: int) -> None:
        scope = self._reading[key] = anyio.CancelScope()
        try:
            async with stream:
                with scope:
                    head = await _read_head(stream)
                self._reading.pop(key, None)
                if scope.cancel_called:
                    return  # dropped for a newer client
                response, head_only = await self._answer(head)
                with anyio.move_on_after(READ_TIMEOUT):
                    await stream.send(_encode(response, head_only=head_only))
                    if response.status == 400:
                        await _drain(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("http_client_failed")
        finally:
            self._reading.pop(key, None)
            self.clients -= 1

    async def _answer(self, head: bytes | None) -> tuple[Response, bool]:
        if head is None:
            return Response(400, b"bad request: head too large, incomplete or too slow\n"), False
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return Response(400, b"bad request line\n"), False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"only GET and HEAD\n"), False
        head_only = method == b"HEAD"
        path = _origin(target).split(b"?", 1)[0].decode("latin-1")
        handler = self.routes.get(path)
        if handler is None:
            return Response(404, b"not found\n"), head_only
        self.requests += 1
        try:
            return await handler(), head_only
        except Exception:
            log.exception("http_handler_failed", path=path)
            return Response(500, b"internal error (see the log)\n"), head_only


async def _read_head(stream: anyio.abc.SocketStream) -> bytes | None:
    """The request head up to its blank line; None when too large, cut or too slow."""
    data = b""
    with anyio.move_on_after(READ_TIMEOUT):
        while (end := _head_end(data)) is None:
            if len(data) > MAX_HEAD:
                return None
            try:
                data += await stream.receive(4096)
            except anyio.EndOfStream:
                return None
        return data[:end] if end <= MAX_HEAD else None
    return None


def _head_end(data: bytes) -> int | None:
    """Where the head's blank line starts: CRLF CRLF, or bare LFs, which RFC 9112 lets a
    server accept (busybox and hand-written health checks send them)."""
    found = _BLANK_LINE.search(data)
    return found.start() if found is not None else None


def _origin(target: bytes) -> bytes:
    """The path of a request target; the absolute form (``http://host:port/metrics``),
    which RFC 9112 says a server must accept, becomes its path."""
    if target.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    return target


async def _drain(stream: anyio.abc.SocketStream) -> None:
    """After a 400: read what the client still sends (bounded, 1 s), so that closing with
    unread data does not reset the connection before the client read the answer."""
    await stream.send_eof()
    left = 64 * 1024
    with anyio.move_on_after(1.0):
        while left > 0:
            try:
                left -= len(await stream.receive(16384))
            except anyio.EndOfStream:
                return


def _encode(response: Response, *, head_only: bool) -> bytes:
    status = response.status
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        # The status page has no script; a browser runs none even if one got in.
        "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body
