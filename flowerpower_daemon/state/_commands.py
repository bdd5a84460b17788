"""The lean pipeline of :class:`~flowerpower_daemon.state.batch.WriteBatch` on one server:
commands collected through redis-py's builders, sent packed on one connection, each reply
parsed as redis-py's pipeline parses it. Imported when a batch first sends (a memory-mode
daemon never imports redis-py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio.connection import Connection
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import DataError, ExecAbortError, ResponseError

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


#: redis-py's options that steer the reading of a reply, not its callback.
_NOT_FOR_CALLBACKS = frozenset(("keys", EMPTY_RESPONSE, NEVER_DECODE))
_MULTI: Command = (("MULTI",), {})
_EXEC: Command = (("EXEC",), {})


async def send_and_read(
    client: Redis,
    conn: Connection,
    stack: list[Command],
    on_sent: Callable[[], object],
    *,
    transaction: bool = False,
) -> list[Any]:
    """Write the packed commands, call ``on_sent`` once the bytes are in the kernel (nothing
    left in the transport's buffer), then read every reply: parsed by ``client`` as its
    pipeline would, an error reply as its exception object (``raise_on_error=False``).
    With ``transaction``, inside ``MULTI``/``EXEC`` (read as redis-py's transaction reads
    it; a command refused when queued fails the whole transaction: the others' replies
    are the ``EXECABORT`` error)."""
    await conn.send_packed_command(
        pack([_MULTI, *stack, _EXEC] if transaction else stack), check_health=False
    )
    writer = getattr(conn, "_writer", None)  # redis-py's stream writer: no public way to ask
    if writer is not None and writer.transport.get_write_buffer_size() == 0:
        on_sent()
    if transaction:
        return await _read_transaction(client, conn, stack)
    replies: list[Any] = []
    for args, options in stack:
        try:
            replies.append(await client.parse_response(conn, args[0], **dict(options)))
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _read_transaction(client: Redis, conn: Connection, stack: list[Command]) -> list[Any]:
    """The replies of ``MULTI``, the stack's commands and ``EXEC``, as the stack's replies."""
    refused: dict[int, ResponseError] = {}
    try:
        await client.parse_response(conn, "_")  # MULTI's OK
    except ResponseError as exc:  # read on: the other replies are on the connection
        refused[-1] = exc
    for i in range(len(stack)):
        try:
            await client.parse_response(conn, "_")  # QUEUED
        except ResponseError as exc:
            refused[i] = exc
    try:
        executed = await client.parse_response(conn, "_")
    except ExecAbortError as exc:
        first = next(iter(refused.values()), exc)
        aborted = ExecAbortError(f"not run: its transaction was refused ({first})")
        return [refused.get(i, aborted) for i in range(len(stack))]
    if refused or not isinstance(executed, list) or len(executed) != len(stack):
        error = refused.get(-1) or ResponseError(f"EXEC answered {executed!r:.200}")
        return [error] * len(stack)
    callbacks = client.response_callbacks
    replies: list[Any] = []
    for (args, options), reply in zip(stack, executed, strict=True):
        callback = callbacks.get(args[0])
        if callback is not None and not isinstance(reply, Exception):
            options = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
            reply = callback(reply, **options)
            if inspect.isawaitable(reply):
                reply = await reply
        replies.append(reply)
    return replies
