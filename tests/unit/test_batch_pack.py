"""WriteBatch's packer writes what redis-py's would, and refuses what redis-py refuses."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError

from flowerpower_daemon.state._commands import Commands, pack


def _redis_py(commands: Commands) -> bytes:
    conn = Redis().connection_pool.make_connection()
    return b"".join(conn.pack_commands([args for args, _ in commands.stack]))


def test_pack_matches_redis_py() -> None:
    c = Commands()
    c.set("k:é", b"v\x00\xff\r\n", ex=60)
    c.zadd("idx", {"r1": 1765000000.123456, b"r2": 3})
    c.delete("a", "b")
    c.xadd("s", {b"data": b"{}"}, maxlen=100, approximate=True)
    c.xack("s", "g", b"1-1", "2-2")
    c.execute_command("SET", "k2", -7, "EX", 5)
    c.execute_command("SCRIPT EXISTS", "abc")  # a two-word name is two arguments
    c.execute_command("SET", "k3", bytearray(b"ba"))
    assert pack(c.stack) == _redis_py(c)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_pack_refuses_what_redis_py_refuses(bad: object) -> None:
    c = Commands()
    c.execute_command("SET", "k", bad)
    with pytest.raises(DataError):
        _redis_py(c)
    with pytest.raises(DataError):
        pack(c.stack)
