"""The FlowerPower project model: ``conf/project.yml`` and ``conf/pipelines/<name>.yml``.

Every model is frozen and rejects unknown keys, so a typo such as
``max_retry`` or ``exector`` is an error naming the file, the key path and
the nearest valid key (:mod:`.loading`). ``${VAR}`` and ``${VAR:-default}``
in string values are taken from the environment before validation.

Every key FlowerPower writes is accepted (0.11/0.20-era files and what 0.37
writes on load): ``null`` means the default, FlowerPower's names map to ours
(``executor.type: synchronous``, ``mlflow.run_tags``, ``with_adapter.tracker``,
``run.pipeline_adapter_cfg`` ...; see :mod:`.fpkeys`), and the keys that do
nothing here are in :data:`~.noeffect.NO_EFFECT`, which warns once per process
for each one a file sets. The ``adapter:`` models are in :mod:`.adapters`;
this module re-exports every name it had before they moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .adapters import AdapterConfig, WithAdapterConfig
from .fpkeys import Frozen, Section, drop_nulls, error_at, nested_at
from .loading import expand_env, format_validation_error, load_yaml_text, validate_model
from .noeffect import NO_EFFECT, NoEffect, no_effect_keys, warn_no_effect
from .schedule import parse_cron, parse_date, parse_interval, parse_timezone

__all__ = [
    "NO_EFFECT",
    "AdapterConfig",
    "CacheConfig",
    "ExecutorConfig",
    "NoEffect",
    "PipelineConfig",
    "ProjectConfig",
    "RetryPolicy",
    "RunConfig",
    "ScheduleConfig",
    "WithAdapterConfig",
    "expand_env",
    "format_validation_error",
    "load_yaml_text",
    "no_effect_keys",
    "validate_model",
    "warn_no_effect",
]

ExecutorType = Literal["local", "threadpool", "processpool", "ray", "dask"]
#: Every name ``executor.type`` accepts, as an error message lists them.
_EXECUTOR_NAMES = "local (or synchronous), threadpool, processpool, ray, dask"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ExecutorConfig(Section):
    """Where a pipeline's nodes run; a plain string is shorthand for ``type``.

    ``synchronous`` (FlowerPower's name) is ``local``.
    """

    type: ExecutorType = "local"
    max_workers: int | None = Field(default=None, ge=1)
    num_cpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        if isinstance(value, str):
            value = {"type": value}
        if isinstance(value, Mapping) and value.get("type") == "synchronous":
            value = {**value, "type": "local"}
        return value

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: object) -> object:
        """An unknown type names every accepted one, ``synchronous`` included (not only
        the Literal's values, which pydantic would list)."""
        if isinstance(value, str) and value not in get_args(ExecutorType):
            raise ValueError(f"unknown executor type {value!r}; use {_EXECUTOR_NAMES}")
        return value


class CacheConfig(Frozen):
    """Hamilton caching; ``cache: true`` enables it for every node."""

    enabled: bool = False
    path: str | None = None
    recompute: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    default_behavior: Literal["default", "recompute", "disable", "ignore"] = "default"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: object) -> object:
        if value is None or isinstance(value, bool):
            return {"enabled": bool(value)}
        if isinstance(value, Mapping) and value and "enabled" not in value:
            # ``cache: {recompute: [...]}`` means caching is on, as in FlowerPower.
            return {**value, "enabled": True}
        return value


class RetryPolicy(Frozen):
    """How often and how patiently a failed run is retried.

    ``max_retries`` counts extra attempts (total = ``max_retries + 1``). The
    delay before retry *n* (1-based) is ``retry_delay * retry_backoff**(n-1)``,
    scaled by ``1 + U(-jitter_factor, jitter_factor)``.
    """

    max_retries: int = Field(default=0, ge=0)
    retry_delay: float = Field(default=5.0, ge=0)
    retry_backoff: float = Field(default=1.0, ge=1.0)
    jitter_factor: float = Field(default=0.0, ge=0.0, le=1.0)
    retry_exceptions: tuple[str, ...] = ()

    @field_validator("retry_exceptions", mode="before")
    @classmethod
    def _one_name(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value


class _RetryBlock(Frozen):
    """FlowerPower's ``run.retry:`` block; its keys are read into ``run.*``."""

    max_retries: int | None = None
    retry_delay: float | None = None
    retry_backoff: float | None = None
    jitter_factor: float | None = None
    retry_exceptions: tuple[str, ...] | str | None = None


_RETRY_KEYS = tuple(RetryPolicy.model_fields)


class RunConfig(Frozen):
    """The ``run:`` section: how one run of the pipeline executes.

    ``retry:`` (FlowerPower's block of the ``retry_*`` keys) is read into them.
    """

    key_blocks: ClassVar[Mapping[str, type[BaseModel]]] = {"retry": _RetryBlock}

    inputs: dict[str, object] = Field(default_factory=dict)
    final_vars: tuple[str, ...] = ()
    config: dict[str, object] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    with_adapter: WithAdapterConfig = Field(default_factory=WithAdapterConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    log_level: LogLevel | None = None
    max_retries: int = Field(default=0, ge=0)
    retry_delay: float = Field(default=5.0, ge=0)
    retry_backoff: float = Field(default=1.0, ge=1.0)
    jitter_factor: float = Field(default=0.0, ge=0.0, le=1.0)
    retry_exceptions: tuple[str, ...] = ()
    timeout: float | None = Field(default=None, gt=0)
    additional_modules: tuple[str, ...] = ()
    reload: bool = False
    on_success: str | None = None
    on_failure: str | None = None
    pipeline_adapter_cfg: AdapterConfig | None = None
    project_adapter_cfg: AdapterConfig | None = None
    adapter: dict[str, object] = Field(default_factory=dict)
    async_driver: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        kept = {k: value[k] for k in ("timeout", "log_level") if k in value}
        data = {**drop_nulls(value, cls), **kept}
        retry = data.pop("retry", None)
        if retry is not None:
            try:
                block = _RetryBlock.model_validate(retry)
            except ValidationError as exc:
                # Report ``run.retry.max_retry``, not ``run.max_retry``.
                raise nested_at("retry", exc) from None
            for key, val in block.model_dump(exclude_none=True).items():
                data.setdefault(key, val)
        for key in ("final_vars", "retry_exceptions", "additional_modules"):
            if isinstance(data.get(key), str):
                data[key] = (data[key],)
        if isinstance(data.get("log_level"), str):
            data["log_level"] = data["log_level"].upper()
        return data

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(**{k: getattr(self, k) for k in _RETRY_KEYS})


class ScheduleConfig(Frozen):
    """The ``schedule:`` section: at most one of ``cron``, ``interval``, ``date``."""

    cron: str | None = None
    interval: timedelta | None = None
    date: datetime | None = None
    timezone: str | None = None
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        data = drop_nulls(value, cls)
        # Errors name the key (``schedule.cron``), not just the section.
        zone = data.get("timezone")
        try:
            tz = parse_timezone(None if zone is None else str(zone))
        except ValueError as exc:
            raise error_at(cls.__name__, "timezone", zone, str(exc)) from None
        parsers: dict[str, Callable[[object], object]] = {
            "cron": parse_cron,
            "interval": parse_interval,
            "date": lambda raw: parse_date(raw, tz),
        }
        for key, parse in parsers.items():
            if data.get(key) is None:
                continue
            try:
                data[key] = parse(data[key])
            except ValueError as exc:
                raise error_at(cls.__name__, key, data[key], str(exc)) from None
        given = [k for k in ("cron", "interval", "date") if data.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of cron, interval, date (got {', '.join(given)})")
        return data

    @property
    def kind(self) -> Literal["cron", "interval", "date"] | None:
        if self.cron is not None:
            return "cron"
        if self.interval is not None:
            return "interval"
        if self.date is not None:
            return "date"
        return None


class JobQueueConfig(BaseModel):
    """``job_queue:`` of project.yml; kept for FlowerPower compatibility."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str | None = "taskiq"


class ProjectConfig(Section):
    """``conf/project.yml``."""

    name: str = "flowerpower-project"
    hooks_dir: str = "hooks"
    job_queue: JobQueueConfig = Field(default_factory=JobQueueConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class PipelineConfig(Section):
    """``conf/pipelines/<name>.yml``."""

    name: str = ""
    run: RunConfig = Field(default_factory=RunConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    params: dict[str, object] = Field(default_factory=dict)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)

    def effective_adapter(self, project: AdapterConfig) -> AdapterConfig:
        """The adapter settings a run uses, as FlowerPower layers them.

        ``project.yml`` < ``run.project_adapter_cfg`` < the pipeline's ``adapter``
        < ``run.pipeline_adapter_cfg``; each layer changes only the keys it sets.
        """
        out = project
        for layer in (self.run.project_adapter_cfg, self.adapter, self.run.pipeline_adapter_cfg):
            if layer is not None:
                out = out.merged(layer)
        return out
