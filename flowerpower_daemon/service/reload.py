"""Reload, the pure part: validate a new config and project, and diff the triggers.

``flowerpowerctl reload`` and SIGHUP run :func:`prepare` in a worker thread
(it reads files, imports pipeline modules and builds drivers), then the
daemon applies :func:`diff` on the event loop. Nothing is applied unless
everything validates: a problem anywhere raises :class:`ConfigError` with
every problem found, and the running config stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from ..errors import ConfigError, ConfigProblem, FlowerPowerError
from ..project.api import FlowerPowerProject
from ..project.hooks import ConfigHook
from ..settings import MqttTrigger, Settings, Trigger, load_settings
from ..state.schedules import Schedule
from .check import check_report, configured_triggers, shown_as

__all__ = [
    "RESTART_KEYS",
    "Prepared",
    "TriggerDiff",
    "diff",
    "prepare",
    "restart_required",
    "warm_up",
]

log = structlog.get_logger("flowerpower_daemon.daemon")

#: Settings a running daemon cannot change; a reload reports them, a restart applies them.
RESTART_KEYS = (
    "mqtt",
    "queue",
    "shared_state",
    "control",
    "http",
    "state_dir",
    "max_concurrent_runs",
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated new config and project, not applied yet."""

    settings: Settings
    project: FlowerPowerProject
    triggers: list[Trigger]


@dataclass(frozen=True, slots=True)
class TriggerDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]


def prepare(config_path: str | None, dynamic: Iterable[Schedule]) -> Prepared:
    """Load and check config + project (blocking); raise ConfigError listing every problem.

    The triggers are the daemon's: enabled config triggers, pipeline schedules,
    and the ``dynamic`` schedules (each must still find its pipeline).
    """
    settings = load_settings(config_path)  # ConfigError on a bad file
    report = check_report(settings)
    if report.errors:  # named by the config file, as `check` names them
        raise ConfigError(shown_as(report.errors, config_path))
    problems: list[ConfigProblem] = []
    report.log_warnings()
    try:
        project = FlowerPowerProject.load(
            settings.project, storage_options=settings.storage_options
        )
    except ConfigError:
        raise
    except FlowerPowerError as exc:
        raise ConfigError([ConfigProblem(config_path or "config", "project", str(exc))]) from None
    triggers: list[Trigger] = list(configured_triggers(settings, project))
    names = {t.name for t in triggers}
    for schedule in dynamic:
        where = "schedules.json"
        if schedule.pipeline not in project.pipelines:
            problems.append(
                ConfigProblem(
                    where,
                    schedule.id,
                    f"dynamic schedule runs pipeline {schedule.pipeline!r}, which the new project "
                    "lacks (remove the schedule first)",
                )
            )
        elif schedule.id in names:
            problems.append(
                ConfigProblem(
                    where,
                    schedule.id,
                    "the new config defines a trigger with this dynamic schedule's id",
                )
            )
        else:
            try:
                triggers.append(schedule.to_trigger())
            except ValueError as exc:  # e.g. its pipeline's new run: keys no longer fit
                problems.append(ConfigProblem(where, schedule.id, str(exc)))
    if problems:
        raise ConfigError(problems)
    return Prepared(settings, project, triggers)


def diff(current: Mapping[str, Trigger], new: Iterable[Trigger]) -> TriggerDiff:
    """Trigger names added, removed, and changed (same name, different settings)."""
    wanted = {t.name: t for t in new}
    return TriggerDiff(
        added=sorted(set(wanted) - set(current)),
        removed=sorted(set(current) - set(wanted)),
        changed=sorted(n for n in set(current) & set(wanted) if current[n] != wanted[n]),
    )


def restart_required(old: Settings, new: Settings) -> list[str]:
    """The :data:`RESTART_KEYS` whose value differs."""
    return [key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key)]


def warm_up(project: FlowerPowerProject, triggers: Iterable[Trigger]) -> None:
    """Import modules and build drivers for the triggered pipelines (blocking: a thread).

    A pipeline that cannot be prepared is logged; its trigger's runs fail with the reason.
    """
    for trig in triggers:
        try:
            project.runner.prepare(trig.pipeline, trig.run)
        except FlowerPowerError as exc:
            log.error(
                "pipeline_not_ready", trigger=trig.name, pipeline=trig.pipeline, error=str(exc)
            )


def load_hooks(project: FlowerPowerProject, triggers: Iterable[Trigger]) -> dict[str, ConfigHook]:
    """Each MQTT-triggered pipeline's ``mqtt_build_config`` hook (blocking: imports user code).

    At start and at every reload, so that a trigger a reload adds gets its hook too.
    """
    from ..project.hooks import load_mqtt_build_config

    hooks: dict[str, ConfigHook] = {}
    for trig in triggers:
        if isinstance(trig, MqttTrigger) and trig.pipeline not in hooks:
            try:
                hook = load_mqtt_build_config(project.files, trig.pipeline)
            except FlowerPowerError as exc:
                log.error("hook_not_loaded", pipeline=trig.pipeline, error=str(exc))
                continue
            if hook is not None:
                hooks[trig.pipeline] = hook
    return hooks
