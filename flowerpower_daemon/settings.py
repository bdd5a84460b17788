"""Daemon settings: a YAML file, every value overridable by ``FLOWERPOWER_*`` env vars.

``FLOWERPOWER_MQTT__URL=mqtt://broker:1883`` overrides ``mqtt.url``; secrets
can come from files (``mqtt.password_file``). Validated once, up front, into
frozen models; :func:`load_settings` reports every problem with its key path.
Relative paths in the file (``project``, ``state_dir``, ``control.socket``,
file triggers' ``path``) are relative to the file's directory, not to the
working directory.

Every trigger is one of the :data:`Trigger` union's models, told apart by its
``type``; code that handles triggers takes a ``Trigger`` (or a narrower
member) and lets mypy check each branch.
"""

from __future__ import annotations

import difflib
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError, ConfigProblem
from .project.config import RunConfig, format_validation_error, load_yaml_text
from .project.schedule import parse_cron, parse_date, parse_interval, parse_timezone
from .redact import redact_url
from .topics import compile_topic

__all__ = [
    "RUN_OVERRIDE_KEYS",
    "CronTrigger",
    "DateTrigger",
    "FileTrigger",
    "IntervalTrigger",
    "MqttSettings",
    "MqttTrigger",
    "QueueSettings",
    "RedisTarget",
    "SentinelSettings",
    "Settings",
    "TimerTrigger",
    "Trigger",
    "TriggerSettings",
    "load_settings",
    "parse_broker",
    "validate_run_overrides",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(_Frozen):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class MqttSettings(_Frozen):
    """The MQTT connection, shared by triggers, results and the status topic."""

    url: str = "mqtt://127.0.0.1:1883"
    embedded_bind: str = "127.0.0.1:1883"
    client_id: str = "flowerpower-daemon"
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    clean_start: bool = False
    session_expiry: int = Field(default=86400, ge=0)
    keepalive: int = Field(default=60, ge=5)
    tls: TlsSettings | None = None
    # A template: ``{client_id}`` is this daemon's client id, so each daemon of a fleet
    # has its own retained status (a literal topic, without placeholders, works too).
    status_topic: str = "flowerpower/status/{client_id}"
    result_topic: str = "flowerpower/results/{pipeline}"
    error_topic: str = "flowerpower/errors/{pipeline}"
    result_qos: Literal[0, 1, 2] = 1
    max_payload_bytes: int = Field(default=256 * 1024, ge=1)
    # orjson itself refuses more than 1024 levels; deeper payloads are refused either way.
    max_payload_depth: int = Field(default=32, ge=1, le=1024)
    max_result_bytes: int = Field(default=256 * 1024, ge=1024)
    # An fsspec URL template ({pipeline}, {trigger}, {run_id}): a larger result is stored
    # whole there and its message carries a reference instead of truncated outputs.
    result_store: str | None = None
    reconnect_min: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    outbox_size: int = Field(default=10_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == "embedded":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(
                f"invalid MQTT url {redact_url(value)!r}: "
                "use mqtt://host:port, mqtts://host:port or 'embedded'"
            )
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when asked)
        except ValueError as exc:
            raise ValueError(f"invalid MQTT url {redact_url(value)!r}: {exc}") from None
        return value

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        if not value:
            return value
        if "+" in value or "#" in value:
            raise ValueError(f"status_topic {value!r}: no wildcards (+, #) in a published topic")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"status_topic {value!r}: {exc}") from None
        unknown = sorted(names - {"client_id"})
        if unknown:
            raise ValueError(
                f"status_topic {value!r}: unknown field(s) {', '.join(unknown)}; use {{client_id}}"
            )
        return value

    @field_validator("result_store")
    @classmethod
    def _result_store(cls, value: str | None) -> str | None:
        if value is None:
            return value
        protocol, sep, _ = value.partition("://")
        if not sep or not protocol:
            raise ValueError(
                f"result_store {value!r} is not a URL: use e.g. "
                "file:///var/lib/flowerpower/results/{run_id}.json or "
                "s3://bucket/results/{pipeline}/{run_id}.json"
            )
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"result_store {value!r}: {exc}") from None
        unknown = sorted(names - {"pipeline", "trigger", "run_id"})
        if unknown:
            raise ValueError(
                f"result_store {value!r}: unknown field(s) {', '.join(unknown)}; "
                "use {pipeline}, {trigger}, {run_id}"
            )
        if "run_id" not in names:
            raise ValueError(f"result_store {value!r} must contain {{run_id}} (one file per run)")
        import fsspec  # deferred: only a config that stores results pays for it

        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"result_store {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _status_level(self) -> MqttSettings:
        if "{client_id}" in self.status_topic and any(c in self.client_id for c in "/+#"):
            raise ValueError(
                f"client_id {self.client_id!r} cannot fill status_topic's {{client_id}} "
                "(one topic level: no /, + or #); change one of them"
            )
        return self

    @model_validator(mode="after")
    def _secret_file(self) -> MqttSettings:
        if self.password_file and self.password is None:
            try:
                secret = Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"password_file {self.password_file!r}: {exc.strerror}") from None
            object.__setattr__(self, "password", secret)
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)

    @property
    def use_tls(self) -> bool:
        return self.tls is not None or urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def own_status_topic(self) -> str:
        """This daemon's status topic: ``status_topic`` with its ``{client_id}``."""
        return self.status_topic.replace("{client_id}", self.client_id)

    @property
    def fleet_status_filter(self) -> str:
        """Every daemon's status topic: ``status_topic`` with ``+`` for ``{client_id}``."""
        return self.status_topic.replace("{client_id}", "+")


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
    sentinel_password: str | None = None

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


#: The keys of a ``run:`` override (a trigger's, or ``flowerpowerctl run``'s and
#: ``schedule add``'s ``run`` argument): the pipeline's ``run:`` block but its inputs and hooks.
RUN_OVERRIDE_KEYS: frozenset[str] = frozenset(
    set(RunConfig.model_fields) - {"inputs", "on_success", "on_failure"}
)


def validate_run_overrides(value: Mapping[str, object]) -> dict[str, object]:
    """Check ``run:`` overrides as a trigger's ``run:`` is checked; ``ValueError`` names the key.

    Unknown keys get a "did you mean"; known keys are validated by the
    pipeline's own ``run:`` model (a bad ``max_retries`` is an error here, not at run time).
    """
    unknown = sorted(set(value) - RUN_OVERRIDE_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(RUN_OVERRIDE_KEYS), 1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown run override(s) {', '.join(hints)}")
    try:
        RunConfig.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'run'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid run override(s): {problems}") from None
    return dict(value)


class _TriggerBase(_Frozen):
    name: str = ""
    pipeline: str
    inputs: dict[str, object] = Field(default_factory=dict)
    run: dict[str, object] = Field(default_factory=dict, description="run: overrides")
    enabled: bool = True
    publish: bool = True
    result_topic: str | None = None
    error_topic: str | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    overlap: Literal["allow", "skip", "queue", "replace"] = "allow"
    dedup_key: str | None = None
    dedup_ttl: float = Field(default=3600.0, gt=0)

    @field_validator("run")
    @classmethod
    def _run_keys(cls, value: dict[str, object]) -> dict[str, object]:
        validate_run_overrides(value)
        return value


class MqttTrigger(_TriggerBase):
    """Run a pipeline for each message on ``topic`` (``+``/``#`` and ``{field}`` wildcards)."""

    type: Literal["mqtt"]
    topic: str
    qos: Literal[0, 1, 2] = 1
    payload: Literal["json", "text", "bytes", "auto"] = "auto"
    # None: the payload must be a JSON object (anything else is an error result).
    payload_input: str | None = "payload"
    shared_group: str | None = None
    # Per-key policies: ``key`` (a template like dedup_key: "{device}", "{payload.id}")
    # says which messages come from the same source.
    key: str | None = None
    max_concurrent_per_key: int | None = Field(default=None, ge=1)
    coalesce: bool = False
    debounce: float | None = Field(default=None, gt=0)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        compile_topic(value)
        return value

    @model_validator(mode="after")
    def _keyed(self) -> MqttTrigger:
        if self.key is None:
            used = [
                name
                for name, value in (
                    ("max_concurrent_per_key", self.max_concurrent_per_key),
                    ("coalesce", self.coalesce),
                    ("debounce", self.debounce),
                )
                if value
            ]
            if used:
                raise ValueError(f'{", ".join(used)} need(s) a key (e.g. key: "{{device}}")')
        return self

    @model_validator(mode="after")
    def _object_only(self) -> MqttTrigger:
        if self.payload_input is None and self.payload not in ("json", "auto"):
            raise ValueError(
                f"payload_input: null (a JSON object is required) needs payload: json or auto, "
                f"not {self.payload}"
            )
        return self


class _TimerBase(_TriggerBase):
    """What cron, interval and date triggers share: lateness and catch-up after downtime.

    ``catch_up`` says what happens at start-up to fire times missed since the
    last fire kept in the state store: ``none`` skips them, ``latest`` runs the
    most recent once, ``all`` runs each (the newest ``max_catch_up``, oldest
    first); fire times older than ``misfire_grace`` seconds are never run.
    """

    catch_up: Literal["none", "latest", "all"] = "latest"
    max_catch_up: int = Field(default=100, ge=1, le=10_000)


class CronTrigger(_TimerBase):
    type: Literal["cron"]
    cron: str
    timezone: str | None = None
    jitter: float = Field(default=0.0, ge=0)
    misfire_grace: float | None = Field(default=3600.0, ge=0)

    @field_validator("cron", mode="before")
    @classmethod
    def _cron(cls, value: str | Mapping[str, object]) -> str:
        return parse_cron(value)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        parse_timezone(value)
        return value


class IntervalTrigger(_TimerBase):
    type: Literal["interval"]
    every: timedelta
    start_at: datetime | None = None
    jitter: float = Field(default=0.0, ge=0)
    misfire_grace: float | None = Field(default=None, ge=0)

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: float | str | Mapping[str, object] | timedelta) -> timedelta:
        return parse_interval(value)

    @field_validator("start_at", mode="before")
    @classmethod
    def _start(cls, value: str | datetime | None) -> datetime | None:
        return None if value is None else parse_date(value)


class DateTrigger(_TimerBase):
    type: Literal["date"]
    at: datetime
    misfire_grace: float | None = Field(default=3600.0, ge=0)

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: str | datetime) -> datetime:
        return parse_date(value)


class FileTrigger(_TriggerBase):
    type: Literal["file"]
    path: str
    patterns: tuple[str, ...] = ("*",)
    recursive: bool = True
    events: tuple[Literal["added", "modified", "deleted"], ...] = ("added",)
    debounce: float = Field(default=0.2, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _glob_alias(cls, value: object) -> object:
        if isinstance(value, Mapping) and "glob" in value:
            data = dict(value)
            glob = data.pop("glob")
            data.setdefault("patterns", [glob] if isinstance(glob, str) else glob)
            return data
        return value


#: A trigger of any kind; ``type`` tells which (validated as :data:`TriggerSettings`).
Trigger = MqttTrigger | CronTrigger | IntervalTrigger | DateTrigger | FileTrigger
#: The triggers a timer fires (config file, pipeline ``schedule:``, dynamic schedules).
TimerTrigger = CronTrigger | IntervalTrigger | DateTrigger
#: :data:`Trigger` as pydantic validates it: discriminated by ``type``.
TriggerSettings = Annotated[Trigger, Field(discriminator="type")]


class ControlSettings(_Frozen):
    socket: str | None = None
    group: str | None = None
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    max_line_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A client that sends no complete request line for this long is disconnected.
    idle_timeout: float = Field(default=600.0, gt=0)
    # Connections served at once; more get a "busy" answer and are closed.
    max_clients: int = Field(default=512, ge=1)


class HistorySettings(_Frozen):
    """The job history: SQLite in the state dir, or Redis when the queue is on Redis."""

    max_jobs: int = Field(default=10_000, ge=1)
    max_age: timedelta = Field(default=timedelta(days=7))
    max_result_bytes: int = Field(default=64 * 1024, ge=1024)

    @field_validator("max_age", mode="before")
    @classmethod
    def _age(cls, value: float | str | Mapping[str, object] | timedelta) -> timedelta:
        return parse_interval(value)


class Settings(BaseSettings):
    """Everything the daemon reads at start-up (see ``config.example.yml``)."""

    model_config = SettingsConfigDict(
        env_prefix="FLOWERPOWER_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    project: str = "."
    storage_options: dict[str, object] = Field(default_factory=dict)
    state_dir: str = ".flowerpower"
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    max_concurrent_runs: int = Field(default=8, ge=1)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    schedule_all: bool = True
    triggers: list[TriggerSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the YAML file (passed as init kwargs).
        return env_settings, init_settings

    @model_validator(mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        if not isinstance(value, Mapping) or not isinstance(value.get("triggers"), list):
            return value
        triggers = []
        seen: set[str] = set()
        for i, trig in enumerate(value["triggers"]):
            if isinstance(trig, Mapping):
                name = trig.get("name") or f"{trig.get('type')}-{trig.get('pipeline')}-{i}"
                if name in seen:
                    raise ValueError(f"triggers[{i}]: duplicate trigger name {name!r}")
                seen.add(name)
                trig = {**trig, "name": name}
            triggers.append(trig)
        return {**value, "triggers": triggers}

    @property
    def state_path(self) -> Path:
        return Path(os.environ.get("STATE_DIRECTORY") or self.state_dir)


def load_settings(path: str | None) -> Settings:
    """Load the YAML file (optional) and the environment; ConfigError lists every problem."""
    shown = path or "<environment>"
    data: dict[str, Any] = {}  # YAML, validated by Settings(**data) (env wins over it)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
        data, problems = load_yaml_text(text, path)
        if problems:
            raise ConfigError(problems)
        _relative_to(Path(path).resolve().parent, data)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Settings, shown)) from None


def _relative_to(base: Path, data: dict[str, object]) -> None:
    """Make the file's relative paths relative to ``base`` (its directory), in place.

    ``project`` (unless a URL), ``state_dir``, ``control.socket`` and file
    triggers' ``path``: the daemon finds the same files from any working
    directory. Values that come from the environment are not touched.
    """

    def fix(holder: dict[str, object], key: str, *, urls: bool = False) -> None:
        value = holder.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            if not (urls and "://" in value):
                holder[key] = os.path.normpath(base / value)

    fix(data, "project", urls=True)
    fix(data, "state_dir")
    control = data.get("control")
    if isinstance(control, dict):
        fix(control, "socket")
    triggers = data.get("triggers")
    for trig in triggers if isinstance(triggers, list) else []:
        if isinstance(trig, dict) and trig.get("type") == "file":
            fix(trig, "path")
