"""The FlowerPower project model: ``conf/project.yml`` and ``conf/pipelines/<name>.yml``.

Every model is frozen and rejects unknown keys, so a typo such as
``max_retry`` or ``exector`` is an error naming the file, the key path and
the nearest valid key. ``${VAR}`` and ``${VAR:-default}`` in string values
are taken from the environment before validation.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..errors import ConfigProblem
from .schedule import parse_cron, parse_date, parse_interval, parse_timezone

__all__ = [
    "AdapterConfig",
    "CacheConfig",
    "ExecutorConfig",
    "PipelineConfig",
    "ProjectConfig",
    "RetryPolicy",
    "RunConfig",
    "ScheduleConfig",
    "WithAdapterConfig",
    "expand_env",
    "format_validation_error",
    "load_yaml_text",
    "validate_model",
]

_M = TypeVar("_M", bound=BaseModel)

ExecutorType = Literal["local", "threadpool", "processpool", "ray", "dask"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _error_at(title: str, key: str, value: Any, message: str) -> ValidationError:
    """A validation error located at ``key`` (raised by a model's before-validator)."""
    kind = PydanticCustomError("value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data(
        title, [InitErrorDetails(type=kind, loc=(key,), input=value)]
    )


def _nested_at(key: str, exc: ValidationError) -> ValidationError:
    """``exc`` with every error's location moved under ``key``."""
    details: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        detail = InitErrorDetails(type=err["type"], loc=(key, *err["loc"]), input=err["input"])
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        details.append(detail)
    return ValidationError.from_exception_data(exc.title, details)


class ExecutorConfig(_Frozen):
    """Where a pipeline's nodes run; a plain string is shorthand for ``type``."""

    type: ExecutorType = "local"
    max_workers: int | None = Field(default=None, ge=1)
    num_cpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        return value


class CacheConfig(_Frozen):
    """Hamilton caching; ``cache: true`` enables it for every node."""

    enabled: bool = False
    path: str | None = None
    recompute: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    default_behavior: Literal["default", "recompute", "disable", "ignore"] = "default"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return {"enabled": bool(value)}
        if isinstance(value, Mapping) and value and "enabled" not in value:
            # ``cache: {recompute: [...]}`` means caching is on, as in FlowerPower.
            return {**value, "enabled": True}
        return value


class WithAdapterConfig(_Frozen):
    """Flags that switch adapters on for a run (FlowerPower's ``with_adapter``)."""

    hamilton_tracker: bool = False
    mlflow: bool = False
    opentelemetry: bool = False
    progressbar: bool = False
    ray: bool = False
    future: bool = False

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name, on in self.model_dump().items() if on)


class RetryPolicy(_Frozen):
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
    def _one_name(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class _RetryBlock(_Frozen):
    max_retries: int | None = None
    retry_delay: float | None = None
    retry_backoff: float | None = None
    jitter_factor: float | None = None
    retry_exceptions: tuple[str, ...] | str | None = None


_RETRY_KEYS = tuple(RetryPolicy.model_fields)


class RunConfig(_Frozen):
    """The ``run:`` section: how one run of the pipeline executes."""

    inputs: dict[str, Any] = Field(default_factory=dict)
    final_vars: tuple[str, ...] = ()
    config: dict[str, Any] = Field(default_factory=dict)
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

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        data = {k: v for k, v in value.items() if v is not None or k in ("timeout", "log_level")}
        retry = data.pop("retry", None)
        if retry is not None:
            try:
                block = _RetryBlock.model_validate(retry)
            except ValidationError as exc:
                # Report ``run.retry.max_retry``, not ``run.max_retry``.
                raise _nested_at("retry", exc) from None
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


class ScheduleConfig(_Frozen):
    """The ``schedule:`` section: at most one of ``cron``, ``interval``, ``date``."""

    cron: str | None = None
    interval: timedelta | None = None
    date: datetime | None = None
    timezone: str | None = None
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        data = dict(value)
        # Errors name the key (``schedule.cron``), not just the section.
        zone = data.get("timezone")
        try:
            tz = parse_timezone(None if zone is None else str(zone))
        except ValueError as exc:
            raise _error_at(cls.__name__, "timezone", zone, str(exc)) from None
        parsers: dict[str, Callable[[Any], Any]] = {
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
                raise _error_at(cls.__name__, key, data[key], str(exc)) from None
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


class HamiltonTrackerConfig(_Frozen):
    username: str | None = None
    api_url: str | None = None
    ui_url: str | None = None
    api_key: str | None = None
    verify: bool = True
    project_id: int | None = None
    dag_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    capture_data_statistics: bool = True
    max_list_length_capture: int = 50
    max_dict_length_capture: int = 10


class MlflowConfig(_Frozen):
    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment_name: str | None = None
    experiment_tags: dict[str, Any] = Field(default_factory=dict)
    run_name: str | None = None
    run_id: str | None = None
    tags: dict[str, Any] = Field(default_factory=dict)
    autolog: bool = False


class OpenTelemetryConfig(_Frozen):
    host: str = "localhost"
    port: int = 4317
    tracer_name: str | None = None


class RayConfig(_Frozen):
    ray_init_config: dict[str, Any] = Field(default_factory=dict)
    shutdown_ray_on_completion: bool = False


class AdapterConfig(_Frozen):
    """Adapter settings, project-wide or per pipeline (pipeline keys win)."""

    hamilton_tracker: HamiltonTrackerConfig = Field(default_factory=HamiltonTrackerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    opentelemetry: OpenTelemetryConfig = Field(default_factory=OpenTelemetryConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def merged(self, override: AdapterConfig, override_raw: Mapping[str, Any]) -> AdapterConfig:
        """Project settings updated by the keys the pipeline file actually set."""
        data = self.model_dump()
        for section, values in override_raw.items():
            if isinstance(values, Mapping):
                data[section] = {
                    **data.get(section, {}),
                    **getattr(override, section).model_dump(include=set(values)),
                }
        return AdapterConfig.model_validate(data)


class JobQueueConfig(BaseModel):
    """``job_queue:`` of project.yml; kept for FlowerPower compatibility."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str = "taskiq"


class ProjectConfig(_Frozen):
    """``conf/project.yml``."""

    name: str = "flowerpower-project"
    job_queue: JobQueueConfig = Field(default_factory=JobQueueConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class PipelineConfig(_Frozen):
    """``conf/pipelines/<name>.yml``."""

    name: str = ""
    run: RunConfig = Field(default_factory=RunConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    params: dict[str, Any] = Field(default_factory=dict)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: v for k, v in value.items() if v is not None}
        return value


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, problems: list[str], path: tuple[str | int, ...] = ()) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of ``value``.

    Unset variables without a default are appended to ``problems`` as
    ``"key.path: message"`` strings and left in place.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is not None:
                return found
            if default is not None:
                return default
            problems.append(
                f"{_dotted(path)}: environment variable {name} is not set "
                f"(use ${{{name}:-default}})"
            )
            return match.group(0)

        return _ENV_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, problems, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, problems, (*path, i)) for i, v in enumerate(value)]
    return value


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml_text(text: str, file: str) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Parse YAML text into a mapping with ``${VAR}`` expanded; problems are returned."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        return {}, [ConfigProblem(file, where, f"invalid YAML: {reason}")]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [ConfigProblem(file, "", f"expected a mapping, got {type(data).__name__}")]
    env_problems: list[str] = []
    expanded = expand_env(data, env_problems)
    problems = [ConfigProblem(file, *p.split(": ", 1)) for p in env_problems]
    return expanded, problems


def _candidates(annotation: Any) -> list[type[BaseModel]]:
    """Model classes inside an annotation (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _candidates(arg)
    return out


def _annotation(model: type[BaseModel], name: str) -> Any:
    info = model.model_fields.get(name)
    return info.annotation if info is not None else None


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (for nearest-key suggestions)."""
    current: type[BaseModel] = model
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        if not isinstance(part, str) or part not in current.model_fields:
            return None
        found = _candidates(current.model_fields[part].annotation)
        if parts and isinstance(parts[0], int):
            parts.pop(0)
        if len(found) > 1 and parts and isinstance(parts[0], str):
            tag = parts[0]
            tagged = [c for c in found if tag in get_args(_annotation(c, "type"))]
            if tagged:
                parts.pop(0)
                found = tagged
        if len(found) != 1:
            return None
        current = found[0]
    return current


def _valid_keys(owner: type[BaseModel]) -> list[str]:
    keys = list(owner.model_fields)
    if owner is RunConfig:
        keys.append("retry")
    return keys


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], file: str
) -> Iterator[ConfigProblem]:
    """Turn pydantic's errors into problems naming file, key path and nearest key."""
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _dotted(loc)
        if err["type"] == "extra_forbidden":
            # ``run.retry`` is a block of RunConfig's retry keys, not a field of its own.
            in_retry = loc[-2:-1] == ("retry",) and _model_at(model, loc[:-1]) is RunConfig
            owner = _RetryBlock if in_retry else _model_at(model, loc)
            valid = _valid_keys(owner) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = f" (valid keys: {', '.join(valid)})" if valid and not close else ""
            yield ConfigProblem(file, key, f"unknown key{hint}{listing}")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            yield ConfigProblem(file, key, msg)


def validate_model(
    model: type[_M], data: Mapping[str, Any], file: str
) -> tuple[_M | None, list[ConfigProblem]]:
    """Validate ``data`` into ``model``; return the model or every problem found."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, list(format_validation_error(exc, model, file))
