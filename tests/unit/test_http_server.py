"""The observe package's pieces in process: ``http.listen`` parsing, the HTTP server on a
real loopback socket, the no-op instrumentation, the exposition."""

from __future__ import annotations

import re
import socket

import anyio
import anyio.to_thread
import pytest

from flowerpower_daemon.errors import FlowerPowerError
from flowerpower_daemon.observe import NO_METRICS, metrics_for
from flowerpower_daemon.observe.server import HttpServer, Response
from flowerpower_daemon.settings import HttpSettings, parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9465", ("::1", 9465)),
        (":9464", ("0.0.0.0", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "host:port", "1.2.3.4:70000", "::1:80"])
def test_bad_listen_addresses_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=r"port|host:port"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (9464, "9464: a port alone; write host:port, e.g. 127.0.0.1:9464"),
        (["127.0.0.1", 9464], "write host:port as text, e.g. 127.0.0.1:9464"),
        (True, "write host:port as text"),
    ],
)
def test_a_listen_value_that_is_not_text_says_what_to_write(value: object, message: str) -> None:
    """``listen: 9464`` (YAML makes it a number) once said only "Input should be a valid
    string"; now the message shows the host:port to write."""
    with pytest.raises(ValueError, match=re.escape(message)):
        HttpSettings(listen=value)


def test_http_settings_are_off_unless_listen_is_set() -> None:
    assert HttpSettings().address is None
    assert HttpSettings(listen=" ").address is None
    assert HttpSettings(listen="127.0.0.1:1").address == ("127.0.0.1", 1)


def _ask(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # all said: a cut-short head ends here
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


async def test_server_answers_routes_errors_and_survives_a_failing_handler() -> None:
    """200 for a route, 404/405/400 for the rest, 500 when a handler raises; the server goes on."""

    async def fine() -> Response:
        return Response(200, b"fine\n")

    async def broken() -> Response:
        raise RuntimeError("handler bug")

    server = HttpServer(("127.0.0.1", 0), {"/fine": fine, "/broken": broken})
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        port = server.port

        async def ask(data: bytes) -> bytes:
            return await anyio.to_thread.run_sync(_ask, port, data)

        ok = await ask(b"GET /fine?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nfine\n")
        assert b"Content-Length: 5\r\n" in ok and b"Connection: close\r\n" in ok
        assert (await ask(b"GET /broken HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
        assert (await ask(b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await ask(b"DELETE /fine HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await ask(b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await ask(b"GET /fine HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400 ")  # cut short
        big = b"GET /fine HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n"
        assert (await ask(big)).startswith(b"HTTP/1.1 400 ")
        assert (await ask(b"GET /fine HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        assert server.clients == 0
        tg.cancel_scope.cancel()


async def test_a_port_in_use_is_an_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(("127.0.0.1", port), {}, key="--http")
        with pytest.raises(FlowerPowerError, match=rf"^--http: cannot listen on 127.0.0.1:{port}"):
            await server.bind()


def test_metrics_off_are_the_shared_no_op_and_on_render_the_exposition() -> None:
    assert metrics_for(False) is NO_METRICS
    assert NO_METRICS.last_fire("x") is None
    on = metrics_for(True)
    on.fired("temp")
    on.timer_fired("tick", 0.002)
    assert on.last_fire("temp") is not None
    text = on.render().decode()  # type: ignore[attr-defined]
    assert 'flowerpower_trigger_fires_total{trigger="temp"} 1.0' in text
    assert 'flowerpower_timer_lateness_seconds_count{trigger="tick"} 1.0' in text
    assert "_created" not in text


async def test_idle_and_trickling_clients_cannot_lock_out_a_scrape() -> None:
    """With every slot held by clients that never finish their head (slowloris), a new
    request still gets its answer: the longest-waiting idle client is dropped for it."""

    async def fine() -> Response:
        return Response(200, b"fine\n")

    server = HttpServer(("127.0.0.1", 0), {"/fine": fine}, max_clients=4)
    idle: list[socket.socket] = []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            for _ in range(6):  # more than the slots: each newer one evicts an older one
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(b"GET /fine HTTP/1.1\r\nX-Slow: ")
                idle.append(s)
            await anyio.sleep(0.3)  # the server accepts them all and waits for their heads
            assert server.clients == 4
            with anyio.fail_after(5):
                answer = await anyio.to_thread.run_sync(
                    _ask, server.port, b"GET /fine HTTP/1.1\r\n\r\n"
                )
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert server.evicted >= 3
            assert server.clients <= 4
            tg.cancel_scope.cancel()
    finally:
        for s in idle:
            s.close()


async def test_bare_lf_heads_and_absolute_targets_are_understood() -> None:
    """RFC 9112 lets a server take bare LF line ends (hand-written and busybox health
    checks send them) and says it must take the absolute form ``http://host/path``."""

    async def fine() -> Response:
        return Response(200, b"fine\n")

    server = HttpServer(("127.0.0.1", 0), {"/fine": fine, "/": fine})
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)

        async def ask(data: bytes) -> bytes:
            return await anyio.to_thread.run_sync(_ask, server.port, data)

        for request in (
            b"GET /fine HTTP/1.1\nHost: a\n\n",
            b"GET /fine HTTP/1.0\n\n",
            b"GET http://a:1/fine?x=1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
            b"GET https://a HTTP/1.1\r\n\r\n",
        ):
            answer = await ask(request)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), (request, answer)
        assert (await ask(b"GET http://a/nope HTTP/1.1\n\n")).startswith(b"HTTP/1.1 404 ")
        assert (await ask(b"GET /fine HTTP/1.1\n")).startswith(b"HTTP/1.1 400 ")  # cut short
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("listen", "family", "loopback"),
    [
        (":0", socket.AF_INET, "127.0.0.1"),
        ("[::]:0", socket.AF_INET6, "::1"),
    ],
)
async def test_wildcard_listen_addresses_serve_their_family(
    listen: str, family: socket.AddressFamily, loopback: str
) -> None:
    """As the README says: ``:PORT`` is every IPv4 interface, ``[::]:PORT`` every IPv6 one."""
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")

    async def fine() -> Response:
        return Response(200, b"fine\n")

    server = HttpServer(parse_listen(listen), {"/fine": fine})
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)

        def ask() -> bytes:
            with socket.socket(family) as s:
                s.settimeout(10)
                s.connect((loopback, server.port))
                s.sendall(b"GET /fine HTTP/1.1\r\n\r\n")
                return s.recv(100)

        assert (await anyio.to_thread.run_sync(ask)).startswith(b"HTTP/1.1 200 ")
        tg.cancel_scope.cancel()
