"""The lean pipeline of :class:`~flowerpower_daemon.state.batch.WriteBatch` on one server:
commands collected through redis-py's builders, sent packed on one connection, each reply
parsed as redis-py's pipeline parses it. Imported when a batch first sends (a memory-mode
daemon never imports redis-py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.connection import Connection
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import DataError, ResponseError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.event import EventDispatcherInterface

__all__ = ["Commands", "pack", "send_and_read"]

Command = tuple[tuple[Any, ...], dict[str, Any]]


class Commands(AsyncCoreCommands):
    """Collects commands through redis-py's own builders (``set``, ``xadd``, ...)."""

    #: Read by no builder the batch uses; declared so that the class is concrete.
    _event_dispatcher = cast("EventDispatcherInterface", None)

    def __init__(self) -> None:
        self.stack: list[Command] = []

    def execute_command(self, *args: Any, **options: Any) -> Commands:
        self.stack.append((args, options))
        return self

    def __len__(self) -> int:
        return len(self.stack)


def pack(stack: list[Command]) -> bytes:
    """The commands in RESP, as redis-py packs them (its ``Encoder``: bytes as they are,
    ``str`` as UTF-8, ``int`` and ``float`` by ``repr``, ``bool`` and others refused), in
    one pass: redis-py's packer costs several type checks and a generator per argument,
    about a tenth of a worker's CPU per run."""
    out: list[bytes] = []
    append = out.append
    for args, _ in stack:
        name, *rest = args
        words = name.split() if isinstance(name, str | bytes) else [name]
        append(b"*%d\r\n" % (len(words) + len(rest)))
        for arg in (*words, *rest):
            if isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, int | float) and not isinstance(arg, bool):
                data = repr(arg).encode()
            elif isinstance(arg, bytearray | memoryview):
                data = bytes(arg)
            else:
                raise DataError(
                    f"Invalid input of type: '{type(arg).__name__}'. "
                    "Convert to a bytes, string, int or float first."
                )
            append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def send_and_read(
    client: Redis, conn: Connection, stack: list[Command], on_sent: Callable[[], object]
) -> list[Any]:
    """Write the packed commands, call ``on_sent`` once the bytes are in the kernel (nothing
    left in the transport's buffer), then read every reply: parsed by ``client`` as its
    pipeline would, an error reply as its exception object (``raise_on_error=False``)."""
    await conn.send_packed_command(pack(stack), check_health=False)
    writer = getattr(conn, "_writer", None)  # redis-py's stream writer: no public way to ask
    if writer is not None and writer.transport.get_write_buffer_size() == 0:
        on_sent()
    replies: list[Any] = []
    for args, options in stack:
        try:
            replies.append(await client.parse_response(conn, args[0], **dict(options)))
        except ResponseError as exc:
            replies.append(exc)
    return replies
