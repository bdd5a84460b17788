"""The FlowerPower project model: ``conf/project.yml`` and ``conf/pipelines/<name>.yml``.

Every model is frozen and rejects unknown keys, so a typo such as
``max_retry`` or ``exector`` is an error naming the file, the key path and
the nearest valid key. ``${VAR}`` and ``${VAR:-default}`` in string values
are taken from the environment before validation.

Every key FlowerPower writes is accepted (0.11/0.20-era files and what 0.37
writes on load): ``null`` means the default, FlowerPower's names map to ours
(``executor.type: synchronous``, ``mlflow.run_tags``, ``with_adapter.tracker``,
``run.pipeline_adapter_cfg`` ...), and the keys that do nothing here are in
:data:`NO_EFFECT`, which warns once per process for each one a file sets.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar, get_args

import structlog
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

log = structlog.get_logger("flowerpower_daemon.project.config")

_M = TypeVar("_M", bound=BaseModel)

ExecutorType = Literal["local", "threadpool", "processpool", "ray", "dask"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _without_nulls(value: Any, model: type[BaseModel]) -> Any:
    """A mapping without the ``null`` values of ``model``'s keys (FlowerPower's "default").

    An unknown key stays, ``null`` or not, so that a typo is still reported.
    """
    if isinstance(value, Mapping):
        known = {*model.model_fields, *_ALIASES.get(model, ())}
        return {k: v for k, v in value.items() if v is not None or k not in known}
    return value


class _Section(_Frozen):
    """A block whose ``null`` values mean the default, as in the files FlowerPower writes."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, value: Any) -> Any:
        return _without_nulls(value, cls)


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


class ExecutorConfig(_Section):
    """Where a pipeline's nodes run; a plain string is shorthand for ``type``.

    ``synchronous`` (FlowerPower's name) is ``local``.
    """

    type: ExecutorType = "local"
    max_workers: int | None = Field(default=None, ge=1)
    num_cpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"type": value}
        if isinstance(value, Mapping) and value.get("type") == "synchronous":
            value = {**value, "type": "local"}
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


def _alias(value: Any, old: str, new: str) -> Any:
    """``value`` with key ``old`` (an older FlowerPower name) moved to ``new``."""
    if isinstance(value, Mapping) and old in value:
        data = dict(value)
        moved = data.pop(old)
        if isinstance(moved, Mapping) and isinstance(data.get(new), Mapping):
            moved = {**moved, **data[new]}
        data.setdefault(new, moved)
        return data
    return value


class WithAdapterConfig(_Section):
    """Flags that switch adapters on for a run (FlowerPower's ``with_adapter``).

    ``tracker`` is the older FlowerPower name of ``hamilton_tracker``.
    """

    hamilton_tracker: bool = False
    mlflow: bool = False
    opentelemetry: bool = False
    progressbar: bool = False
    ray: bool = False
    future: bool = False

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, value: Any) -> Any:
        return _alias(value, "tracker", "hamilton_tracker")

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


class HamiltonTrackerConfig(_Section):
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


class MlflowConfig(_Section):
    """MLflow settings; FlowerPower's ``run_tags`` are our ``tags`` (``tags`` win on a clash)."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment_name: str | None = None
    experiment_tags: dict[str, Any] = Field(default_factory=dict)
    experiment_description: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    run_description: str | None = None
    tags: dict[str, Any] = Field(default_factory=dict)
    autolog: bool = False

    @model_validator(mode="before")
    @classmethod
    def _run_tags(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "run_tags" in value:
            data = dict(value)
            run_tags = data.pop("run_tags")
            if run_tags is not None:
                tags = data.get("tags")
                if isinstance(run_tags, Mapping) and isinstance(tags, Mapping | None):
                    data["tags"] = {**run_tags, **(tags or {})}
                else:
                    # Let the model report the bad value at ``tags``.
                    data["tags"] = run_tags
            return data
        return value


class OpenTelemetryConfig(_Section):
    host: str = "localhost"
    port: int = 4317
    tracer_name: str | None = None


class RayConfig(_Section):
    ray_init_config: dict[str, Any] = Field(default_factory=dict)
    shutdown_ray_on_completion: bool = False


class AdapterConfig(_Section):
    """Adapter settings, project-wide or per pipeline (pipeline keys win).

    ``tracker`` is the older FlowerPower name of ``hamilton_tracker``.
    """

    hamilton_tracker: HamiltonTrackerConfig = Field(default_factory=HamiltonTrackerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    opentelemetry: OpenTelemetryConfig = Field(default_factory=OpenTelemetryConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, value: Any) -> Any:
        return _alias(_without_nulls(value, cls), "tracker", "hamilton_tracker")

    def merged(self, override: AdapterConfig) -> AdapterConfig:
        """These settings updated by the keys ``override`` actually set (``null`` sets none)."""
        data = self.model_dump()
        for section in override.model_fields_set:
            part: BaseModel = getattr(override, section)
            data[section] = {**data[section], **part.model_dump(include=part.model_fields_set)}
        return AdapterConfig.model_validate(data)


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
    pipeline_adapter_cfg: AdapterConfig | None = None
    project_adapter_cfg: AdapterConfig | None = None
    adapter: dict[str, Any] = Field(default_factory=dict)
    async_driver: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        kept = {k: value[k] for k in ("timeout", "log_level") if k in value}
        data = {**_without_nulls(value, cls), **kept}
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
        data = _without_nulls(value, cls)
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


class JobQueueConfig(BaseModel):
    """``job_queue:`` of project.yml; kept for FlowerPower compatibility."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str | None = "taskiq"


class ProjectConfig(_Section):
    """``conf/project.yml``."""

    name: str = "flowerpower-project"
    hooks_dir: str = "hooks"
    job_queue: JobQueueConfig = Field(default_factory=JobQueueConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class PipelineConfig(_Section):
    """``conf/pipelines/<name>.yml``."""

    name: str = ""
    run: RunConfig = Field(default_factory=RunConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    params: dict[str, Any] = Field(default_factory=dict)
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


def _is(*values: Any) -> Callable[[Any], bool]:
    """A test for values that ask for nothing this daemon does not do anyway."""
    return lambda value: any(value == v and type(value) is type(v) for v in values)


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == {} or value == []


@dataclass(frozen=True, slots=True)
class NoEffect:
    """A FlowerPower key accepted here without effect, and why.

    ``key`` is the dotted path in the file (an ``adapter.*`` key is also
    looked up under ``run.pipeline_adapter_cfg`` / ``run.project_adapter_cfg``
    and, for ``hamilton_tracker``, under the older name ``tracker``).
    ``harmless`` tells the values that ask for nothing we do not do anyway
    (the defaults FlowerPower writes): those stay silent.
    """

    key: str
    reason: str
    harmless: Callable[[Any], bool] = _empty


_TRACKER_LIMITS = (
    "the Hamilton UI tracker's capture settings are not passed on yet "
    "(the SDK's defaults apply: statistics on, 50 list items, 10 dict items)"
)

#: Every FlowerPower key accepted without effect (the README's table mirrors this).
NO_EFFECT: tuple[NoEffect, ...] = (
    NoEffect(
        "hooks_dir",
        "hooks are read from hooks/<pipeline>/hook.py here",
        lambda v: v is None or str(v).strip("/") in ("hooks", "./hooks"),
    ),
    NoEffect(
        "job_queue",
        "the daemon queues runs itself (queue: in its config); FlowerPower's "
        "RQ/APScheduler job queue is not used",
        lambda v: _empty(v)
        or (isinstance(v, Mapping) and set(v) <= {"type"} and v.get("type") in (None, "taskiq")),
    ),
    NoEffect(
        "adapter.opentelemetry.host",
        "no OpenTelemetry exporter is set up here (spans go to the process's global "
        "tracer provider)",
    ),
    NoEffect(
        "adapter.opentelemetry.port",
        "no OpenTelemetry exporter is set up here (spans go to the process's global "
        "tracer provider)",
    ),
    NoEffect(
        "adapter.mlflow.autolog",
        "MLflow autologging is not switched on here",
        lambda v: _empty(v) or v is False,
    ),
    NoEffect(
        "adapter.mlflow.run_name",
        "placeholders such as {timestamp} are not filled in here: the name is used as written",
        lambda v: _empty(v) or "{" not in str(v),
    ),
    NoEffect("adapter.mlflow.experiment_description", "not passed on to MLflow yet"),
    NoEffect("adapter.mlflow.run_description", "not passed on to MLflow yet"),
    NoEffect(
        "adapter.hamilton_tracker.capture_data_statistics",
        _TRACKER_LIMITS,
        lambda v: _empty(v) or v is True,
    ),
    NoEffect(
        "adapter.hamilton_tracker.max_list_length_capture",
        _TRACKER_LIMITS,
        lambda v: _empty(v) or _is(50)(v),
    ),
    NoEffect(
        "adapter.hamilton_tracker.max_dict_length_capture",
        _TRACKER_LIMITS,
        lambda v: _empty(v) or _is(10)(v),
    ),
    NoEffect(
        "run.with_adapter.ray",
        "the flag adds no adapter here; run on Ray with run.executor.type: ray",
        lambda v: _empty(v) or v is False,
    ),
    NoEffect(
        "run.adapter",
        "adapter objects can only be passed from Python (FlowerPower's run(adapter=...))",
    ),
    NoEffect(
        "run.async_driver",
        "the driver is chosen from the module here (async when it has async def nodes)",
    ),
)

_ADAPTER_BLOCKS = (("adapter",), ("run", "pipeline_adapter_cfg"), ("run", "project_adapter_cfg"))


def _places(key: str) -> Iterator[tuple[str, ...]]:
    parts = tuple(key.split("."))
    if parts[0] != "adapter":
        yield parts
        return
    section, rest = parts[1], parts[2:]
    names = (section, "tracker") if section == "hamilton_tracker" else (section,)
    for block in _ADAPTER_BLOCKS:
        for name in names:
            yield (*block, name, *rest)


def _lookup(data: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return False, None
        data = data[part]
    return True, data


def no_effect_keys(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(key path, reason)`` of each key of one file's YAML that is accepted without effect."""
    for entry in NO_EFFECT:
        for path in _places(entry.key):
            found, value = _lookup(data, path)
            if found and not entry.harmless(value):
                yield ".".join(path), entry.reason


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_no_effect(data: Mapping[str, Any], file: str) -> None:
    """Log one warning per process for each key of ``data`` without effect here."""
    for key, reason in no_effect_keys(data):
        with _warned_lock:
            if (key, reason) in _warned:
                continue
            _warned.add((key, reason))
        log.warning(
            "config_key_has_no_effect",
            message=f"{file}: {key}: accepted, has no effect here: {reason}",
            file=file,
            key=key,
            reason=reason,
        )


def _forget_warnings() -> None:
    """Let every warning of :func:`warn_no_effect` be logged again (for tests)."""
    with _warned_lock:
        _warned.clear()



_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(
    value: Any, problems: list[str], path: tuple[str | int, ...] = ()
) -> Any:
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


#: Keys a model takes under another name (FlowerPower's older or current spelling).
_ALIASES: dict[type[BaseModel], tuple[str, ...]] = {
    RunConfig: ("retry",),
    MlflowConfig: ("run_tags",),
    AdapterConfig: ("tracker",),
    WithAdapterConfig: ("tracker",),
}


def _valid_keys(owner: type[BaseModel]) -> list[str]:
    return [*owner.model_fields, *_ALIASES.get(owner, ())]


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
