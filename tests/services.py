"""Real Mosquitto and Redis servers for tests, started on free loopback ports.

Every server is our own child process with its own temporary config, data
and log directory; the system services on 1883/6379 are never touched.

Fixtures (registered in ``tests/conftest.py``):

``mosquitto`` / ``redis_server``
    Function-scoped, already started. May be stopped, killed and restarted;
    the port (and so ``.url``) stays the same across restarts.
``mosquitto_session`` / ``redis_session``
    One server for the whole session, for tests that only need a broker.
    ``stop``/``kill``/``restart`` raise: use unique topics, client ids and
    keys instead of restarting.
``mosquitto_factory`` / ``redis_factory``
    Function-scoped callables that start extra servers, optionally with
    config overrides, e.g. ``mosquitto_factory(max_queued_messages=10)``.
``redis_cluster``
    A 3-master Redis Cluster (no replicas) on three loopback ports, slots
    assigned by ``redis-cli --cluster create``; ``.url`` is
    ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``.
``redis_tls``
    A redis-server that speaks only TLS, with a self-signed certificate for
    127.0.0.1 made by ``openssl``; ``.url`` is ``rediss://127.0.0.1:PORT/0``
    and ``.ca_file`` the certificate to trust.
``redis_sentinel``
    A redis-server master and one ``redis-server --sentinel`` monitoring it
    as ``mymaster``; ``.url`` is ``redis+sentinel://127.0.0.1:SP/mymaster/0``.

The broker config is derived from ``deploy/mosquitto.conf`` (the one we
recommend for production): its global part is kept, persistence location,
logging and user are replaced, and a loopback listener is appended.

A missing binary skips the test ("mosquitto binary not found: apt-get
install mosquitto"), or fails it when ``FLOWERPOWER_REQUIRE_SERVICES=1`` so CI
never skips silently. ``FLOWERPOWER_MOSQUITTO_BIN`` / ``FLOWERPOWER_REDIS_BIN``
point at a specific binary instead of searching PATH (plus /usr/sbin).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio.to_thread
import pytest

__all__ = [
    "DEPLOY_MOSQUITTO_CONF",
    "REQUIRED_MOSQUITTO_SETTINGS",
    "MosquittoService",
    "RedisClusterNodes",
    "RedisSentinelService",
    "RedisService",
    "RedisTlsService",
    "Service",
    "ServiceStartError",
    "find_binary",
    "free_port",
    "mosquitto",
    "mosquitto_config",
    "mosquitto_factory",
    "mosquitto_session",
    "redis_cluster",
    "redis_config",
    "redis_factory",
    "redis_sentinel",
    "redis_server",
    "redis_session",
    "redis_tls",
    "require_binary",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_MOSQUITTO_CONF = REPO_ROOT / "deploy" / "mosquitto.conf"

LOOPBACK = "127.0.0.1"
REQUIRE_ENV = "FLOWERPOWER_REQUIRE_SERVICES"
# Searched after PATH: Debian installs mosquitto in /usr/sbin, which is not
# on a normal user's PATH.
EXTRA_BIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/sbin")

START_TIMEOUT = 10.0  # seconds until the server must answer
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL

# Settings the test broker config must contain (checked on every start, so a
# deploy/mosquitto.conf that drops one of them fails loudly).
REQUIRED_MOSQUITTO_SETTINGS: Mapping[str, str] = {
    "set_tcp_nodelay": "true",
    "persistence": "true",
    "allow_anonymous": "true",
}
REQUIRED_MOSQUITTO_KEYS = (
    "persistence_location",
    "max_queued_messages",
    "max_inflight_messages",
    "listener",
)

# Keys of deploy/mosquitto.conf the test config replaces or must not inherit
# (paths of the production host, auth, TLS).
_MOSQUITTO_OVERRIDDEN_KEYS = frozenset(
    {
        "persistence_location",
        "persistence_file",
        "log_dest",
        "log_type",
        "user",
        "pid_file",
        "include_dir",
        "password_file",
        "acl_file",
        "psk_file",
        "allow_anonymous",
        "listener",
        "port",
        "bind_address",
        "bind_interface",
    }
)


class ServiceStartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


# ----------------------------------------------------------------- helpers


_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``timeout`` s (bounded either way)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` now (never the same one twice per process)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        with _ports_lock:
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("no free TCP port found")


def _binary_env_var(name: str) -> str:
    return "FLOWERPOWER_" + name.split("-")[0].upper() + "_BIN"


def find_binary(name: str) -> str | None:
    """Path of executable ``name``: $FLOWERPOWER_<NAME>_BIN, else PATH + /usr/sbin."""
    override = os.environ.get(_binary_env_var(name))
    if override:
        return override if os.access(override, os.X_OK) and Path(override).is_file() else None
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    return shutil.which(name, path=search)


def require_binary(name: str, package: str | None = None) -> str:
    """``find_binary`` or skip the test (fail it when FLOWERPOWER_REQUIRE_SERVICES=1)."""
    path = find_binary(name)
    if path is not None:
        return path
    message = f"{name} binary not found: apt-get install {package or name}"
    override = os.environ.get(_binary_env_var(name))
    if override:
        message += f" (or fix {_binary_env_var(name)}={override})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} [{REQUIRE_ENV}=1]", pytrace=False)
    pytest.skip(message)


def _parse_conf_value(line: str) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    key, _, value = stripped.partition(" ")
    return key, value.strip()


def mosquitto_config(
    port: int,
    data_dir: Path,
    base: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """The test broker config: deploy/mosquitto.conf's global part + test settings.

    Everything before the first ``listener`` line of ``base`` is kept except
    host paths, auth and logging; ``overrides`` replace (or add) global
    options, e.g. ``{"max_queued_messages": 10}``; then a loopback listener
    on ``port`` with anonymous access is appended.
    """
    base = DEPLOY_MOSQUITTO_CONF if base is None else base
    overrides = dict(overrides or {})
    kept: list[str] = []
    for line in base.read_text().splitlines():
        parsed = _parse_conf_value(line)
        if parsed is None:
            continue
        if parsed[0] == "listener":
            break  # per-listener settings follow: the tests bring their own
        if parsed[0] not in _MOSQUITTO_OVERRIDDEN_KEYS:
            kept.append(line.strip())

    def fmt(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    recommended = [
        f"# generated by tests/services.py from {base}",
        *kept,
        "# --- test settings",
        f"persistence_location {data_dir}{os.sep}",
        # stderr is redirected to the log file; log everything but debug.
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        # Stay the current user when run as root (CI): the temp dir is ours.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"listener {port} {LOOPBACK}",
        "allow_anonymous true",
    ]
    # The recommended config must be complete; a test may still deviate
    # from it on purpose through overrides.
    _check_mosquitto_config("\n".join(recommended))
    if overrides:
        recommended = [
            line
            for line in recommended
            if (parsed := _parse_conf_value(line)) is None or parsed[0] not in overrides
        ]
        # Global options: placed before the listener line for readability.
        at = next(i for i, line in enumerate(recommended) if line.startswith("listener "))
        recommended[at:at] = [
            "# --- overrides of this test",
            *(f"{key} {fmt(value)}" for key, value in overrides.items()),
        ]
    return "\n".join(recommended) + "\n"


def _check_mosquitto_config(text: str) -> None:
    settings: dict[str, str] = {}
    for line in text.splitlines():
        parsed = _parse_conf_value(line)
        if parsed is not None:
            settings[parsed[0]] = parsed[1]
    missing = [k for k in REQUIRED_MOSQUITTO_KEYS if k not in settings]
    wrong = [
        f"{k} {v} (got {settings.get(k)!r})"
        for k, v in REQUIRED_MOSQUITTO_SETTINGS.items()
        if settings.get(k) != v
    ]
    if missing or wrong:
        raise ServiceStartError(
            "test broker config lacks required settings "
            f"(check {DEPLOY_MOSQUITTO_CONF}): missing {missing}, expected {wrong}"
        )


def redis_config(
    port: int,
    data_dir: Path,
    *,
    appendonly: bool = True,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """A redis.conf for a throwaway loopback server on ``port``.

    No RDB snapshots; with ``appendonly`` every write is fsynced to the AOF
    (``appendfsync always``), so data survives restart() and even kill().
    """
    settings: dict[str, object] = {
        "port": port,
        "bind": LOOPBACK,
        "protected-mode": "yes",
        "daemonize": "no",
        "dir": str(data_dir),
        "logfile": '""',  # stdout, which goes to the log file
        "loglevel": "notice",
        "save": '""',
        "appendonly": "yes" if appendonly else "no",
        "appendfsync": "always",
        "hz": 100,  # notices SIGTERM within 10 ms instead of up to ~1 s
        "databases": 16,
    }
    settings.update(overrides or {})
    return "".join(f"{key} {value}\n" for key, value in settings.items())


# ------------------------------------------------------------------ service


_live: set[Service] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only on abnormal exits
    with _live_lock:
        leftovers = list(_live)
    for service in leftovers:
        with contextlib.suppress(Exception):
            service._terminate(signal.SIGKILL)


class Service:
    """A server child process with a fixed port, temp dir and log file.

    ``start()`` returns once the server answers its protocol (bounded by
    ``start_timeout``); ``stop()`` sends SIGTERM (SIGKILL after
    ``stop_timeout``), ``kill()`` sends SIGKILL, ``restart()`` = stop + start
    on the same port, so ``url`` stays valid. ``astart()``, ``astop()``,
    ``arestart()``, ``akill()`` do the same from async code without blocking
    the event loop. Not reentrant: drive one service from one task.
    """

    binary_name: ClassVar[str]
    package: ClassVar[str]
    scheme: ClassVar[str]

    def __init__(
        self,
        binary: str,
        base_dir: Path,
        *,
        port: int | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        shared: bool = False,
    ) -> None:
        self.binary = binary
        self.host = LOOPBACK
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.dir = base_dir
        self.data_dir = base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = base_dir / self.config_name
        self.log_path = base_dir / "server.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.shared = shared
        self.starts = 0  # how many times the process was started
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to override
    config_name: ClassVar[str] = "server.conf"
    ready_log_line: ClassVar[str]  # logged once the server listens
    fatal_log_lines: ClassVar[tuple[str, ...]] = ()  # logged when it cannot serve

    def render_config(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, sock: socket.socket) -> bool:
        """True when the server on ``sock`` answers its protocol."""
        raise NotImplementedError

    # -- public API
    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the server (no-op when running) and wait until it answers."""
        if self.running:
            return
        for attempt in range(5):
            try:
                self._start_once()
                return
            except ServiceStartError as exc:
                # The port was free when picked but another process took it:
                # pick another one, but only before anyone has seen the URL.
                if (
                    self.starts > 1
                    or self._fixed_port
                    or "in use" not in str(exc).lower()
                    or attempt == 4
                ):
                    raise
                self.starts = 0
                self.port = free_port()

    def stop(self) -> None:
        """SIGTERM (a clean shutdown, which saves persistent state), SIGKILL after a bound."""
        self._check_not_shared("stop")
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash. State not yet written to disk is lost."""
        self._check_not_shared("kill")
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """stop() then start() on the same port."""
        self._check_not_shared("restart")
        self.stop()
        self.start()

    async def astart(self) -> None:
        await anyio.to_thread.run_sync(self.start)

    async def astop(self) -> None:
        await anyio.to_thread.run_sync(self.stop)

    async def akill(self) -> None:
        await anyio.to_thread.run_sync(self.kill)

    async def arestart(self) -> None:
        await anyio.to_thread.run_sync(self.restart)

    def close(self) -> None:
        """Final cleanup (fixture teardown): stop whatever is running."""
        self._terminate(signal.SIGTERM)

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state} dir={self.dir}>"

    # -- internals
    def _check_not_shared(self, what: str) -> None:
        if self.shared:
            raise RuntimeError(
                f"{what}() on a session-scoped {self.binary_name} shared by other tests;"
                " use the function-scoped fixture to stop or restart a server"
            )

    def _start_once(self) -> None:
        self.config_path.write_text(self.render_config())
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            log_offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with _live_lock:
            _live.add(self)
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise

    def _start_log(self, offset: int) -> str:
        """What the server logged since it was started."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _wait_ready(self, log_offset: int) -> None:
        """Wait for the server's "ready" log line, then for it to answer on the port.

        Both are needed: mosquitto 2.0 keeps running when its listener cannot
        bind ("Address already in use"), and the port may then answer for
        another process.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_error: object = "no ready line in the log yet"
        logged_ready = False
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise ServiceStartError(
                    f"{self.binary_name} exited with code {rc} on start"
                    f" (port {self.port}); log {self.log_path}:\n{self.log_tail()}"
                )
            if not logged_ready:
                text = self._start_log(log_offset)
                start_up = text.split(self.ready_log_line, 1)[0]
                for pattern in self.fatal_log_lines:
                    if pattern in start_up:
                        raise ServiceStartError(
                            f"{self.binary_name} failed on start (port {self.port}):"
                            f" {pattern!r}; log {self.log_path}:\n{self.log_tail()}"
                        )
                logged_ready = self.ready_log_line in text
            if logged_ready:
                try:
                    with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                        sock.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
                        if self._probe(sock):
                            return
                        last_error = "unexpected answer to the protocol probe"
                except OSError as exc:
                    last_error = exc
            if time.monotonic() >= deadline:
                raise ServiceStartError(
                    f"{self.binary_name} did not answer on {self.host}:{self.port} within"
                    f" {self.start_timeout} s (last error: {last_error!r});"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                deadline = time.monotonic() + self.stop_timeout
                while True:
                    try:
                        proc.wait(timeout=0.02)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if time.monotonic() >= deadline:
                        proc.kill()
                        proc.wait(timeout=self.stop_timeout)
                        break
                    # mosquitto can miss the signal's wake-up and sleep up to
                    # 1 s in epoll before it notices; a connection wakes it.
                    with contextlib.suppress(OSError):
                        socket.create_connection((self.host, self.port), timeout=0.1).close()
        finally:
            self._proc = None
            with _live_lock:
                _live.discard(self)
            with contextlib.suppress(OSError), self.log_path.open("ab") as log:
                log.write(f"--- stopped ({sig.name}), rc={proc.returncode}\n".encode())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class MosquittoService(Service):
    """A mosquitto broker; ``url`` is ``mqtt://127.0.0.1:PORT``."""

    binary_name = "mosquitto"
    package = "mosquitto"
    scheme = "mqtt"
    config_name = "mosquitto.conf"
    # Logged after the listeners were opened (or failed to open).
    ready_log_line = " running"
    fatal_log_lines = ("Address already in use", "Error: ")

    def __init__(
        self,
        binary: str,
        base_dir: Path,
        *,
        overrides: Mapping[str, object] | None = None,
        base_config: Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.overrides = dict(overrides or {})
        self.base_config = base_config
        super().__init__(binary, base_dir, **kwargs)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def render_config(self) -> str:
        return mosquitto_config(self.port, self.data_dir, self.base_config, self.overrides)

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _probe(self, sock: socket.socket) -> bool:
        # MQTT 3.1.1 CONNECT, clean session, keepalive 0, client id "fp-probe".
        client_id = b"fp-probe"
        var_header = b"\x00\x04MQTT\x04\x02\x00\x00"
        payload = len(client_id).to_bytes(2, "big") + client_id
        body = var_header + payload
        sock.sendall(b"\x10" + bytes([len(body)]) + body)
        connack = _recv_exact(sock, 4)
        ok = connack == b"\x20\x02\x00\x00"
        if ok:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        return ok


class RedisService(Service):
    """A redis-server; ``url`` is ``redis://127.0.0.1:PORT/0`` (``redis://:PASSWORD@...``
    with ``password``, which sets ``requirepass``)."""

    binary_name = "redis-server"
    package = "redis-server"
    scheme = "redis"
    config_name = "redis.conf"
    ready_log_line = "Ready to accept connections"

    def __init__(
        self,
        binary: str,
        base_dir: Path,
        *,
        appendonly: bool = True,
        overrides: Mapping[str, object] | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.appendonly = appendonly
        self.password = password
        self.overrides = dict(overrides or {})
        if password is not None:
            self.overrides["requirepass"] = password
        super().__init__(binary, base_dir, **kwargs)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def render_config(self) -> str:
        return redis_config(
            self.port, self.data_dir, appendonly=self.appendonly, overrides=self.overrides
        )

    def command(self) -> list[str]:
        return [self.binary, str(self.config_path)]

    def _probe(self, sock: socket.socket) -> bool:
        # "-LOADING ..." while the AOF is replayed: not ready yet.
        if self.password is not None:
            sock.sendall(f"AUTH {self.password}\r\n".encode())
            if _recv_exact(sock, 5) != b"+OK\r\n":
                return False
        sock.sendall(b"PING\r\n")
        return _recv_exact(sock, 7) == b"+PONG\r\n"


# ----------------------------------------------------------------- fixtures


S = TypeVar("S", bound=Service)


def _make(cls: type[S], tmp_path_factory: pytest.TempPathFactory, **kwargs: Any) -> S:
    binary = require_binary(cls.binary_name, cls.package)
    base = tmp_path_factory.mktemp(cls.binary_name.split("-")[0], numbered=True)
    service = cls(binary, base, **kwargs)
    try:
        service.start()
    except BaseException:
        service.close()
        raise
    return service


@contextlib.contextmanager
def _factory(cls: type[S], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., S]]:
    made: list[S] = []

    def make(**kwargs: Any) -> S:
        service = _make(cls, tmp_path_factory, **kwargs)
        made.append(service)
        return service

    try:
        yield make
    finally:
        for service in reversed(made):
            service.close()


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., MosquittoService]]:
    """``make(overrides=None, base_config=None, port=None, start_timeout=10.0, ...)``.

    Starts a new broker per call; all are stopped at the end of the test.
    """
    with _factory(MosquittoService, tmp_path_factory) as make:
        yield make


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisService]]:
    """``make(appendonly=True, overrides=None, password=None, port=None, ...)``: a new
    redis-server per call."""
    with _factory(RedisService, tmp_path_factory) as make:
        yield make


@pytest.fixture
def mosquitto(
    mosquitto_factory: Callable[..., MosquittoService],
) -> MosquittoService:
    """A started broker of its own for this test; restartable, persistent."""
    return mosquitto_factory()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisService]) -> RedisService:
    """A started redis-server of its own for this test; AOF on, restartable."""
    return redis_factory()


@pytest.fixture(scope="session")
def mosquitto_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MosquittoService]:
    """One broker for the whole session: do not stop it; use unique topics/client ids."""
    service = _make(MosquittoService, tmp_path_factory, shared=True)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisService]:
    """One redis-server for the whole session: do not stop it; use unique keys."""
    service = _make(RedisService, tmp_path_factory, shared=True)
    try:
        yield service
    finally:
        service.close()


# ------------------------------------------------- Redis Cluster and Sentinel


class RedisClusterNodes:
    """Three cluster-enabled redis-servers made one cluster (every slot assigned, state ok)."""

    def __init__(self, nodes: list[RedisService]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}"

    def create(self, timeout: float = START_TIMEOUT) -> None:
        cli = require_binary("redis-cli", "redis-tools")
        addresses = [f"{n.host}:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while True:
            states = [
                subprocess.run(
                    [cli, "-h", n.host, "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                ).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() >= deadline:
                raise ServiceStartError(f"cluster not ok within {timeout} s: {states}")
            time.sleep(0.05)


class RedisSentinelService(Service):
    """``redis-server --sentinel`` monitoring ``master`` (a RedisService) as ``master_name``."""

    binary_name = "redis-server"
    package = "redis-server"
    scheme = "redis+sentinel"
    config_name = "sentinel.conf"
    ready_log_line = "+monitor master"

    def __init__(
        self, binary: str, base_dir: Path, *, master: RedisService, master_name: str, **kwargs: Any
    ) -> None:
        self.master = master
        self.master_name = master_name
        super().__init__(binary, base_dir, **kwargs)

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.host}:{self.port}/{self.master_name}/0"

    def render_config(self) -> str:
        name = self.master_name
        return (
            f"port {self.port}\nbind {LOOPBACK}\ndaemonize no\ndir {self.data_dir}\n"
            'logfile ""\n'
            f"sentinel monitor {name} {self.master.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
        )

    def command(self) -> list[str]:
        return [self.binary, str(self.config_path), "--sentinel"]

    def _probe(self, sock: socket.socket) -> bool:
        sock.sendall(b"PING\r\n")
        return _recv_exact(sock, 7) == b"+PONG\r\n"


@pytest.fixture
def redis_cluster(
    redis_factory: Callable[..., RedisService],
) -> RedisClusterNodes:
    """A 3-node Redis Cluster of our own (stopped with the test's redis_factory)."""
    nodes = [
        redis_factory(
            appendonly=False,
            overrides={
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                # The bus on a port of its own: the default, port + 10000, may be taken
                # (or above 65535).
                "cluster-port": free_port(),
                "cluster-node-timeout": 2000,
            },
        )
        for _ in range(3)
    ]
    cluster = RedisClusterNodes(nodes)
    cluster.create()
    return cluster


@pytest.fixture
def redis_sentinel(
    redis_factory: Callable[..., RedisService], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisSentinelService]:
    """A master and one sentinel monitoring it as ``mymaster``; ``.master`` is the master."""
    master = redis_factory(appendonly=False)
    service = _make(RedisSentinelService, tmp_path_factory, master=master, master_name="mymaster")
    try:
        yield service
    finally:
        service.close()


class RedisTlsService(RedisService):
    """A redis-server on a TLS port only (``tls-port``; the plain port is off)."""

    scheme = "rediss"

    def __init__(self, binary: str, base_dir: Path, **kwargs: Any) -> None:
        self.ca_file = base_dir / "cert.pem"
        key = base_dir / "key.pem"
        subprocess.run(
            [
                require_binary("openssl", "openssl"),
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(self.ca_file),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        super().__init__(binary, base_dir, appendonly=False, **kwargs)
        self.overrides.update(
            {
                "tls-cert-file": self.ca_file,
                "tls-key-file": key,
                "tls-ca-cert-file": self.ca_file,
                "tls-auth-clients": "no",
            }
        )

    @property
    def url(self) -> str:
        return f"rediss://{self.host}:{self.port}/0"

    def render_config(self) -> str:
        text = redis_config(self.port, self.data_dir, appendonly=False, overrides=self.overrides)
        return text.replace(f"port {self.port}\n", f"port 0\ntls-port {self.port}\n", 1)

    def _probe(self, sock: socket.socket) -> bool:
        import ssl

        context = ssl.create_default_context(cafile=str(self.ca_file))
        with context.wrap_socket(sock, server_hostname=self.host) as tls:
            tls.sendall(b"PING\r\n")
            return _recv_exact(tls, 7) == b"+PONG\r\n"


@pytest.fixture
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTlsService]:
    """A TLS-only redis-server of its own (``.url`` rediss://, ``.ca_file`` to trust)."""
    with _factory(RedisTlsService, tmp_path_factory) as make:
        yield make()
