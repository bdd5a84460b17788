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

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ..errors import ConfigError, ConfigProblem
from ..project.config import format_validation_error, load_yaml_text
from ..project.schedule import parse_interval
from .base import _Frozen
from .homeassistant import HomeAssistantSettings
from .http import HttpSettings, parse_listen
from .mqtt import MqttSettings, TlsSettings
from .queue import QueueSettings, RedisTarget, SentinelSettings, parse_broker
from .triggers import (
    RUN_OVERRIDE_KEYS,
    CronTrigger,
    DateTrigger,
    FileTrigger,
    IntervalTrigger,
    MqttTrigger,
    TimerTrigger,
    Trigger,
    TriggerSettings,
    validate_run_overrides,
)

__all__ = [
    "RUN_OVERRIDE_KEYS",
    "CronTrigger",
    "DateTrigger",
    "FileTrigger",
    "HomeAssistantSettings",
    "HttpSettings",
    "IntervalTrigger",
    "MqttSettings",
    "MqttTrigger",
    "QueueSettings",
    "RedisTarget",
    "SentinelSettings",
    "Settings",
    "TimerTrigger",
    "TlsSettings",
    "Trigger",
    "TriggerSettings",
    "load_settings",
    "parse_broker",
    "parse_listen",
    "validate_run_overrides",
]


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
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    shared_state: str | None = Field(
        default=None,
        description="a Redis URL where daemons on the memory queue share timer state and locks",
    )
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

    @field_validator("shared_state")
    @classmethod
    def _shared_state(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_broker(value)  # the forms of queue.broker, bar memory
            except ValueError as exc:  # worded for queue.broker
                message = str(exc).replace("invalid queue.broker", "not a Redis URL")
                raise ValueError(message.replace("use 'memory', ", "use ")) from None
        return value

    @model_validator(mode="after")
    def _one_shared_redis(self) -> Settings:
        if self.shared_state is not None and self.queue.is_redis:
            raise ValueError(
                "shared_state: the queue is on Redis (queue.broker), and daemons share their"
                " timer state there already; leave shared_state out"
            )
        return self

    @property
    def state_path(self) -> Path:
        return Path(os.environ.get("STATE_DIRECTORY") or self.state_dir)

    @property
    def shared_redis(self) -> RedisTarget | None:
        """Where daemons share timer state and locks: the queue's Redis, else
        ``shared_state``; ``None``: this daemon keeps them in its state dir."""
        if self.queue.is_redis:
            return self.queue.redis
        if self.shared_state is not None:
            return parse_broker(self.shared_state)
        return None


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
        raise ConfigError(
            [_untagged(p) for p in format_validation_error(exc, Settings, shown)]
        ) from None


# pydantic puts a tagged union's tag into the error's path: triggers[0].cron.cron
_TAG_IN_KEY = re.compile(r"^(triggers\[\d+\])\.(?:mqtt|cron|interval|date|file)\.")


def _untagged(problem: ConfigProblem) -> ConfigProblem:
    """``problem`` keyed as the file spells it (``triggers[0].cron``, not ``...cron.cron``)."""
    key = _TAG_IN_KEY.sub(r"\1.", problem.key)
    return problem if key == problem.key else ConfigProblem(problem.file, key, problem.message)


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
