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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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
    "Settings",
    "TimerTrigger",
    "Trigger",
    "TriggerSettings",
    "load_settings",
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


class QueueSettings(_Frozen):
    """taskiq: ``memory`` (in this process) or a ``redis://`` URL (scale out with workers)."""

    broker: str = "memory"
    queue_name: str = "flowerpower"
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
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"invalid queue.broker {redact_url(value)!r}: use 'memory' or redis://host:port/db"
            )
        return value

    @property
    def is_redis(self) -> bool:
        return self.broker != "memory"


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
                holder[key] = str(base / value)

    fix(data, "project", urls=True)
    fix(data, "state_dir")
    control = data.get("control")
    if isinstance(control, dict):
        fix(control, "socket")
    triggers = data.get("triggers")
    for trig in triggers if isinstance(triggers, list) else []:
        if isinstance(trig, dict) and trig.get("type") == "file":
            fix(trig, "path")
