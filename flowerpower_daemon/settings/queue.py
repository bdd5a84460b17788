"""``queue:``: memory or Redis (one server, Sentinel, Cluster), parsed into a target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from ..redact import redact_url
from .base import _Frozen

RedisMode = Literal["server", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[RedisMode, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("server", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_BROKER_FORMS = (
    "use 'memory', redis://[:password@]host:port/db, rediss://... (TLS), "
    "redis+sentinel://[:password@]host:26379,host2:26379/master/db or "
    "redis+cluster://[:password@]host:port,host2:port"
)


@dataclass(frozen=True)
class RedisTarget:
    """Where the queue's Redis is, parsed from ``queue.broker`` (and ``queue.sentinel``).

    ``url`` is what redis-py's ``from_url`` reads (credentials, db, TLS and
    query options): the broker URL itself for one server, else a ``redis://``
    (``rediss://``) URL of the first node; ``nodes`` are the sentinels or the
    cluster's start-up nodes.
    """

    mode: RedisMode
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_password: str | None = field(default=None, repr=False)  # never in a log

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")

    @property
    def display(self) -> str:
        """Where it is, without credentials or options: for logs and status."""
        parts = urlsplit(self.url)
        if self.mode == "server":
            if parts.scheme == "unix":
                return f"unix://{parts.path}"
            return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "sentinel":
            return f"{parts.scheme}+sentinel://{hosts}/{self.master}{parts.path}"
        return f"{parts.scheme}+cluster://{hosts}"


def _host_port(text: str, default_port: int, broker: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest:
            host = ""
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise ValueError(f"invalid queue.broker {redact_url(broker)!r}: no host in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"invalid queue.broker {redact_url(broker)!r}: bad port in {text!r}")
    return host, port


def parse_broker(value: str, *, sentinel_password: str | None = None) -> RedisTarget:
    """The :class:`RedisTarget` of a Redis ``queue.broker``; ``ValueError`` (password
    redacted) for anything else."""
    scheme, sep, rest = value.partition("://")
    form = _SCHEMES.get(scheme.lower()) if sep else None
    if form is None:
        raise ValueError(f"invalid queue.broker {redact_url(value)!r}: {_BROKER_FORMS}")
    mode, tls = form
    if mode == "server":
        parts = urlsplit(value)
        if scheme.lower() != "unix" and not parts.hostname:
            raise ValueError(f"invalid queue.broker {redact_url(value)!r}: no host")
        _check_options(value, value)
        return RedisTarget("server", value)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    default_port = 26379 if mode == "sentinel" else 6379
    nodes = tuple(_host_port(h.strip(), default_port, value) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ValueError(f"invalid queue.broker {redact_url(value)!r}: no host")
    segments = [unquote(p) for p in path.split("/") if p]
    master = ""
    if mode == "sentinel":
        if not segments:
            raise ValueError(
                f"invalid queue.broker {redact_url(value)!r}: name the master, "
                "redis+sentinel://host:26379/<master>/<db>"
            )
        master, segments = segments[0], segments[1:]
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError(f"invalid queue.broker {redact_url(value)!r}: the db must be a number")
    db = int(segments[0]) if segments else 0
    if mode == "cluster" and db != 0:
        raise ValueError(
            f"invalid queue.broker {redact_url(value)!r}: a Redis Cluster has db 0 only"
        )
    host, port = nodes[0]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'rediss' if tls else 'redis'}://{userinfo}{at}{shown}:{port}/{db}"
    url += f"?{query}" if query else ""
    _check_options(url, value)
    return RedisTarget(mode, url, nodes, master, sentinel_password)


def _check_options(url: str, broker: str) -> None:
    """redis-py's own URL parser on ``url``: its error names a bad query option."""
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"invalid queue.broker {redact_url(broker)!r}: {exc}") from None


class SentinelSettings(_Frozen):
    """``queue.sentinel``: a Redis master found through Redis Sentinel."""

    master: str = Field(min_length=1, description="the master's name the sentinels monitor")
    sentinels: list[str] = Field(min_length=1, description="host:port of each sentinel")
    password: str | None = Field(default=None, description="the Redis master's password")
    username: str | None = None
    sentinel_password: str | None = Field(default=None, description="the sentinels' password")
    db: int = Field(default=0, ge=0)
    tls: bool = False

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, value: list[str]) -> list[str]:
        for item in value:
            if "://" in item or not item.strip():
                raise ValueError(f"sentinel {item!r}: use host:port (26379 when left out)")
            try:
                _host_port(item.strip(), 26379, item)
            except ValueError:
                raise ValueError(f"sentinel {item!r}: use host:port") from None
        return value

    def url(self) -> str:
        """The equivalent ``redis+sentinel://`` URL (without the sentinels' password)."""
        auth = ""
        if self.password is not None or self.username is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        hosts = ",".join(s.strip() for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{quote(self.master, safe='')}/{self.db}"


class QueueSettings(_Frozen):
    """taskiq: ``memory`` (in this process) or Redis (scale out with workers): one server
    (``redis://``, ``rediss://``, ``unix://``), a Sentinel-managed master
    (``redis+sentinel://`` or the ``sentinel`` block) or a Cluster
    (``redis+cluster://`` or ``cluster: true``).

    With ``sentinel`` or ``cluster: true``, ``broker`` is set to the equivalent
    ``redis+sentinel://`` / ``redis+cluster://`` URL, so whatever shows or logs
    ``broker`` shows where the queue is.
    """

    broker: str = "memory"
    sentinel: SentinelSettings | None = None
    cluster: bool = False
    queue_name: str = Field(default="flowerpower", min_length=1)
    consumer_group: str = "flowerpower-workers"
    reclaim_after: float = Field(
        default=60.0, gt=0, description="seconds before an unacked run is reclaimed"
    )
    worker_concurrency: int = Field(default=4, ge=1)
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="starts of a run whose worker died each time before it is recorded as failed",
    )

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        if value != "memory":
            parse_broker(value)
        return value

    @model_validator(mode="after")
    def _topology(self) -> QueueSettings:
        if self.sentinel is not None:
            url = self.sentinel.url()
            if self.cluster:
                raise ValueError(
                    "queue.cluster and queue.sentinel: a Sentinel-managed master is not a"
                    " Redis Cluster; use one of them"
                )
            if "broker" in self.model_fields_set and self.broker not in ("memory", url):
                raise ValueError(
                    "queue.sentinel: leave queue.broker out (the block says where Redis is),"
                    " or give a redis+sentinel:// queue.broker instead of the block"
                )
            object.__setattr__(self, "broker", url)
        elif self.cluster:
            if self.broker == "memory":
                raise ValueError("queue.cluster: true needs queue.broker: redis://host:port")
            scheme, _, rest = self.broker.partition("://")
            mode, tls = _SCHEMES[scheme.lower()]
            if mode == "sentinel" or scheme.lower() == "unix":
                raise ValueError(
                    f"queue.cluster: true needs a redis:// or rediss:// queue.broker, not"
                    f" {redact_url(self.broker)!r}"
                )
            if mode == "server":
                url = f"{'rediss' if tls else 'redis'}+cluster://{rest}"
                parse_broker(url)  # a db other than 0, say
                object.__setattr__(self, "broker", url)
        return self

    @property
    def is_redis(self) -> bool:
        return self.broker != "memory"

    @property
    def redis(self) -> RedisTarget:
        """Where the Redis queue and the shared state are (only when :attr:`is_redis`)."""
        secret = self.sentinel.sentinel_password if self.sentinel is not None else None
        return parse_broker(self.broker, sentinel_password=secret)
