"""The control socket: a Unix stream socket speaking :mod:`.protocol`.

Where: ``control.socket`` from the settings; by default
``$RUNTIME_DIRECTORY/control.sock`` under systemd (``RuntimeDirectory=``),
else ``<state_dir>/control.sock`` (``./.flowerpower/control.sock`` with the
default state dir). A relative ``control.socket`` in the config file is
relative to the file's directory (see ``settings.py``).

Who: the socket file is created ``0600`` (owner only), or ``0660`` owned by
``control.group`` when one is configured, without a moment at a wider mode
(the mode is set on the socket before ``bind`` and the file is bound under a
temporary name, then renamed into place). Each peer is then checked with
``SO_PEERCRED``: root and the daemon's own uid are always allowed, plus
``control.allowed_uids``, plus peers with a primary or supplementary group
(``SO_PEERGROUPS``) in ``control.allowed_gids`` (by default the gid of
``control.group``).

One daemon per socket: ``<socket>.lock`` is held with ``flock`` for the
daemon's lifetime. A second daemon finds it held and refuses to start
(:class:`ControlSocketError`); a socket file left by a crashed daemon is
stale (nobody holds the lock, nobody answers) and is replaced. The socket
is removed at exit if it is still ours.

Robustness: requests longer than ``control.max_line_bytes`` get
``too_large`` and the connection is closed; any other bad line gets an
error answer; at most ``max_clients`` connections are served at once (more
get ``busy``, ``control.max_clients``); a client that sends no complete line
within ``control.idle_timeout`` (a partial line included) or does not read
its answers within 10 s is dropped. No client can disturb the daemon: every
failure ends at its connection.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from ..errors import FlowerPowerError
from ..settings import ControlSettings
from ..state import pidlock
from .protocol import ProtocolError, Request, error_message, parse_request

__all__ = ["Connection", "ControlServer", "ControlSocketError", "PeerCredentials", "socket_path"]

log = structlog.get_logger("flowerpower_daemon.control")

_BAD_CONNECTION = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


class ControlSocketError(FlowerPowerError, OSError):
    """The control socket cannot be set up (in use by another daemon, bad path or group)."""


def socket_path(
    settings: ControlSettings, state_dir: Path, env: dict[str, str] | None = None
) -> Path:
    """The control socket's path for these settings (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    if settings.socket:
        return Path(settings.socket)
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "control.sock"
    return state_dir / "control.sock"


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


Handler = Callable[[Request, "Connection"], Awaitable[None]]


class Connection:
    """One client connection: answers go out through :meth:`send`."""

    def __init__(
        self,
        stream: SocketStream,
        reader: BufferedByteReceiveStream,
        peer: PeerCredentials,
        send_timeout: float,
    ) -> None:
        self.stream = stream
        self.reader = reader
        self.peer = peer
        self.send_timeout = send_timeout

    async def send(self, message: object) -> None:
        """Send one message line; a client that does not read within the timeout is dropped."""
        from ..project.encoding import dumps

        with anyio.fail_after(self.send_timeout):
            await self.stream.send(dumps(message) + b"\n")

    async def until_closed(self) -> None:
        """Return when the client closes its end (what it sends meanwhile is discarded)."""
        with contextlib.suppress(*_BAD_CONNECTION):
            while True:
                await self.reader.receive()


class ControlServer:
    """Claims the socket (:meth:`claim`), then serves clients (:meth:`serve`)."""

    def __init__(
        self,
        settings: ControlSettings,
        path: Path,
        handler: Handler,
        *,
        max_clients: int | None = None,
        idle_timeout: float | None = None,
        send_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.path = path
        self.handler = handler
        self.max_clients = settings.max_clients if max_clients is None else max_clients
        self.idle_timeout = settings.idle_timeout if idle_timeout is None else idle_timeout
        self.send_timeout = send_timeout
        self.clients = 0
        self.requests = 0
        self.rejected = 0
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None
        self._gid = _group_id(settings.group)
        self._allowed_uids = {0, os.geteuid(), *settings.allowed_uids}
        gids = settings.allowed_gids or ((self._gid,) if self._gid is not None else ())
        self._allowed_gids = set(gids)

    # ------------------------------------------------------------ the socket

    @contextlib.contextmanager
    def claim(self) -> Iterator[ControlServer]:
        """Hold the lock and the bound socket for the ``with`` block (blocking; start-up only)."""
        self._bind()
        try:
            yield self
        finally:
            self._release()

    def _bind(self) -> None:
        path = self.path
        if len(os.fsencode(path.parent / f".{path.name}.{os.getpid()}")) > 100:
            raise ControlSocketError(
                f"control socket path {str(path)!r} is too long for a Unix socket; "
                "set control.socket to a shorter path"
            )
        self._make_parent()
        self._lock()
        try:
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                # The mode the file is created with (Linux), so it is never world-accessible.
                os.fchmod(sock.fileno(), 0o600)
                tmp = path.parent / f".{path.name}.{os.getpid()}"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                sock.bind(os.fspath(tmp))
                if self._gid is not None:
                    # Usually already ours (the service's own group): no chown needed,
                    # which systemd's SystemCallFilter=~@privileged would refuse.
                    if os.stat(tmp).st_gid != self._gid:
                        os.chown(tmp, -1, self._gid)
                    os.chmod(tmp, 0o660)
                else:
                    os.chmod(tmp, 0o600)
                sock.listen(1024)
                os.rename(tmp, path)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            self._unlock()
            if isinstance(exc, ControlSocketError):
                raise
            raise ControlSocketError(f"cannot create control socket {str(path)!r}: {exc}") from exc
        except BaseException:
            self._unlock()
            raise
        self._sock = sock
        self._inode = os.stat(path).st_ino
        log.info(
            "control_socket_listening",
            path=str(path),
            mode=oct(stat.S_IMODE(os.stat(path).st_mode)),
        )

    def _make_parent(self) -> None:
        parent = self.path.parent
        if parent.is_dir():
            return
        try:
            parent.mkdir(parents=True, mode=0o750 if self._gid is not None else 0o700)
            if self._gid is not None:
                os.chown(parent, -1, self._gid)
        except OSError as exc:
            raise ControlSocketError(f"cannot create directory {str(parent)!r}: {exc}") from exc

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self._lock_fd = pidlock.hold(lock_path)
        except pidlock.LockHeld as exc:
            raise ControlSocketError(
                f"control socket {str(self.path)!r} is in use by another running daemon "
                f"(pid {exc.owner}); stop it first (each daemon needs its own state_dir and"
                " control socket)"
            ) from None
        except OSError as exc:
            raise ControlSocketError(f"cannot open lock file {str(lock_path)!r}: {exc}") from exc

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            pidlock.release(self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> None:
        """Remove a socket file nobody serves; refuse to touch anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(
                f"{str(self.path)!r} exists and is not a socket; refusing to replace it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(self.path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlSocketError(
                    f"cannot tell whether {str(self.path)!r} is in use: {exc}"
                ) from exc
        else:
            raise ControlSocketError(
                f"control socket {str(self.path)!r} is in use by another process; "
                "stop it first, or give this daemon another control.socket"
            )
        finally:
            probe.close()
        os.unlink(self.path)
        log.warning("stale_control_socket_replaced", path=str(self.path))

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None
        self._unlock()

    # ------------------------------------------------------------ serving

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; each is served in a task of its own."""
        if self._sock is None:
            raise RuntimeError("ControlServer.serve() before claim()")
        sock, self._sock = self._sock, None  # the listener owns it from here
        listener = await SocketListener.from_socket(sock)
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, do not die
                    log.error("control_accept_failed", error=str(exc))
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(self._serve_client, stream, name="control-client")

    async def _serve_client(self, stream: SocketStream) -> None:
        async with stream:
            try:
                peer = _peer_credentials(stream)
                reader = BufferedByteReceiveStream(stream)
                conn = Connection(stream, reader, peer, self.send_timeout)
                if not self._allowed(peer):
                    self.rejected += 1
                    log.warning("control_peer_rejected", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                    await conn.send(
                        error_message(
                            None,
                            "forbidden",
                            f"uid {peer.uid} / gid {peer.gid} may not use this socket",
                        )
                    )
                    return
                if self.clients >= self.max_clients:
                    self.rejected += 1
                    await conn.send(error_message(None, "busy", "too many control clients"))
                    return
                self.clients += 1
                try:
                    await self._requests(conn)
                finally:
                    self.clients -= 1
            except (*_BAD_CONNECTION, TimeoutError):
                pass
            except Exception:
                log.exception("control_client_failed")

    async def _requests(self, conn: Connection) -> None:
        limit = self.settings.max_line_bytes
        while True:
            try:
                with anyio.fail_after(self.idle_timeout):
                    line = await conn.reader.receive_until(b"\n", limit)
            except anyio.DelimiterNotFound:
                await conn.send(
                    error_message(
                        None, "too_large", f"request line longer than {limit} bytes; closing"
                    )
                )
                return
            except (anyio.IncompleteRead, anyio.EndOfStream, TimeoutError):
                return
            if not line.strip():
                continue
            self.requests += 1
            try:
                request = parse_request(line)
            except ProtocolError as exc:
                await conn.send(error_message(exc.request_id, exc.code, exc.message, exc.details))
                continue
            await self.handler(request, conn)

    def _allowed(self, peer: PeerCredentials) -> bool:
        if peer.uid in self._allowed_uids or peer.gid in self._allowed_gids:
            return True
        return not self._allowed_gids.isdisjoint(peer.groups)


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def _peer_credentials(stream: SocketStream) -> PeerCredentials:
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
    data = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return PeerCredentials(pid, uid, gid, _peer_groups(raw))


def _peer_groups(raw: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (``SO_PEERGROUPS``); empty where unsupported."""
    try:
        data = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:
        return ()
    return struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(f"control.group: unknown group {group!r}") from None
