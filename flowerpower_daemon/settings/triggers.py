"""``triggers:``: one model per kind, the :data:`Trigger` union, and ``run:`` overrides."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..project.config import RunConfig
from ..project.schedule import parse_cron, parse_date, parse_interval, parse_timezone
from ..topics import compile_topic
from .base import _Frozen

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
