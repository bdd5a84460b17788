"""What ``flowerpower-daemon check`` and a reload validate: the project and every
trigger against its pipeline, all problems at once.

Only the pipelines the daemon's triggers use must be sound: a problem in
``conf/pipelines/<name>.yml`` or ``pipelines/<name>.py`` of a pipeline no
trigger names is a warning (:func:`split_problems`); anything else
(``project.yml``, a triggered pipeline's files, the triggers) is an error.

Apart from the daemon so that ``reload`` can use it without importing the daemon.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import TypeAdapter, ValidationError

from ..errors import ConfigError, ConfigProblem, FlowerPowerError
from ..project.api import FlowerPowerProject
from ..project.config import load_yaml_text
from ..settings import (
    CronTrigger,
    DateTrigger,
    FileTrigger,
    IntervalTrigger,
    MqttTrigger,
    Settings,
    TimerTrigger,
    Trigger,
    TriggerSettings,
)

__all__ = [
    "CheckReport",
    "check",
    "check_report",
    "check_without_settings",
    "configured_triggers",
    "http_problems",
    "redis_policy_problems",
    "schedule_triggers",
    "shared_timer_warnings",
    "split_problems",
    "used_pipelines",
]

log = structlog.get_logger("flowerpower_daemon.daemon")  # what start and reload log

# A pipeline's own files: its YAML under conf/pipelines/ or its module under pipelines/.
_PIPELINE_FILE = re.compile(
    r"(?:^|/)(?:conf/pipelines/(?P<conf>\w+)\.ya?ml|pipelines/(?P<mod>\w+)\.py)$"
)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """``errors`` stop the daemon; ``warnings`` concern pipelines no trigger uses;
    ``config_warnings`` are settings that work but likely not as meant (timers that
    every daemon on a shared subscription would fire)."""

    errors: list[ConfigProblem] = field(default_factory=list)
    warnings: list[ConfigProblem] = field(default_factory=list)
    config_warnings: list[ConfigProblem] = field(default_factory=list)

    def log_warnings(self) -> None:
        """The warnings in the daemon's log, as its start and a reload say them."""
        for problem in self.warnings:
            log.warning("pipeline_not_loaded", problem=str(problem), reason="no trigger runs it")
        for problem in self.config_warnings:
            log.warning("config_warning", key=problem.key, problem=problem.message)


def split_problems(
    problems: Iterable[ConfigProblem], used: Iterable[str]
) -> tuple[list[ConfigProblem], list[ConfigProblem]]:
    """(errors, warnings): a problem in the own files of a pipeline not in ``used`` is a
    warning; every other problem is an error."""
    wanted = set(used)
    errors: list[ConfigProblem] = []
    warnings: list[ConfigProblem] = []
    for problem in problems:
        match = _PIPELINE_FILE.search(problem.file.replace("\\", "/"))
        name = match and (match.group("conf") or match.group("mod"))
        (warnings if name and name not in wanted else errors).append(problem)
    return errors, warnings


def used_pipelines(settings: Settings, dynamic: Iterable[str] = ()) -> set[str]:
    """The pipelines the config's enabled triggers (and ``dynamic`` schedules) run."""
    return {t.pipeline for t in settings.triggers if t.enabled} | set(dynamic)


def schedule_triggers(settings: Settings, project: FlowerPowerProject) -> list[TimerTrigger]:
    """Every pipeline's ``schedule:`` as a timer trigger (FlowerPower's ``schedule_all``)."""
    if not settings.schedule_all:
        return []
    out: list[TimerTrigger] = []
    for name, cfg in sorted(project.pipelines.items()):
        sched = cfg.schedule
        if not sched.enabled or sched.kind is None:
            continue
        trigger = f"schedule:{name}"
        if sched.cron:
            out.append(
                CronTrigger(
                    type="cron",
                    cron=sched.cron,
                    timezone=sched.timezone,
                    name=trigger,
                    pipeline=name,
                )
            )
        elif sched.interval:
            out.append(
                IntervalTrigger(type="interval", every=sched.interval, name=trigger, pipeline=name)
            )
        elif sched.date:
            out.append(DateTrigger(type="date", at=sched.date, name=trigger, pipeline=name))
    return out


def http_problems(settings: Settings) -> list[ConfigProblem]:
    """``http.listen`` without prometheus-client installed (the ``metrics`` extra)."""
    from ..observe import extra_problem

    problem = extra_problem() if settings.http.listen else None
    return [problem] if problem is not None else []


def shown_as(problems: Iterable[ConfigProblem], path: str | None) -> list[ConfigProblem]:
    """``problems`` with the config file's own (labelled ``config`` by the checks, which see
    only the settings) named by ``path``, as a user calls the file."""
    shown = path or "<environment>"
    return [ConfigProblem(shown, p.key, p.message) if p.file == "config" else p for p in problems]


def check(settings: Settings) -> list[ConfigProblem]:
    """Validate the project and every trigger against its pipeline; return the errors."""
    return check_report(settings).errors


def check_report(settings: Settings) -> CheckReport:
    """Validate the project and every trigger against its pipeline: errors and warnings."""
    project, failed = _load_project(settings.project, settings.storage_options)
    if project is None:
        return CheckReport(failed)
    problems, warnings = split_problems(project.problems, used_pipelines(settings))
    problems.extend(redis_policy_problems(settings))
    problems.extend(http_problems(settings))
    problems.extend(_trigger_problems(project, enumerate(settings.triggers)))
    return CheckReport(problems, warnings, shared_timer_warnings(settings, project))


def check_without_settings(path: str | None) -> CheckReport:
    """What ``check`` can still validate when the settings do not (their problems are
    reported apart): the project the config names (``FLOWERPOWER_PROJECT``, its
    ``project:``, or the default ``.``) and each trigger that is valid on its own,
    so that one run lists every problem. Nothing when the file cannot be read or
    is not YAML (unless ``FLOWERPOWER_PROJECT`` names the project): which project
    it means is unknown, and the default's problems would only mislead."""
    raw: dict[str, object] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            return CheckReport()
        raw, unparsed = load_yaml_text(text, path)  # its problems are the settings' too
        if unparsed and not raw and not os.environ.get("FLOWERPOWER_PROJECT"):
            return CheckReport()  # not YAML (or not a mapping): which project is unknown
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    in_file = raw.get("project")
    project_dir = os.environ.get("FLOWERPOWER_PROJECT") or "."
    if project_dir == "." and isinstance(in_file, str) and in_file:
        # Relative to the file's directory, as load_settings resolves it.
        project_dir = in_file if "://" in in_file else os.path.normpath(base / in_file)
    options = raw.get("storage_options")
    project, failed = _load_project(project_dir, options if isinstance(options, dict) else {})
    if project is None:
        return CheckReport(failed)
    triggers = _valid_triggers(raw.get("triggers"), base)
    used = {t.pipeline for _, t in triggers if t.enabled}
    problems, warnings = split_problems(project.problems, used)
    problems.extend(_trigger_problems(project, triggers))
    return CheckReport(problems, warnings)


def _load_project(
    project_dir: str, storage_options: dict[str, object]
) -> tuple[FlowerPowerProject | None, list[ConfigProblem]]:
    """The project, or ``None`` and why it does not load (then nothing of it runs)."""
    try:
        return FlowerPowerProject.load(project_dir, storage_options=storage_options), []
    except ConfigError as exc:  # project.yml itself
        return None, list(exc.problems)
    except FlowerPowerError as exc:
        return None, [ConfigProblem("config", "project", str(exc))]


def _valid_triggers(raw: object, base: Path) -> list[tuple[int, Trigger]]:
    """The config file's triggers that validate on their own, with their index (the others
    are among the settings' problems)."""
    adapter: TypeAdapter[Trigger] = TypeAdapter(TriggerSettings)
    out: list[tuple[int, Trigger]] = []
    for i, item in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(item, Mapping):
            continue
        data = {"name": f"{item.get('type')}-{item.get('pipeline')}-{i}", **item}
        path = data.get("path")
        if data.get("type") == "file" and isinstance(path, str) and path:
            data["path"] = os.path.normpath(base / path)
        try:
            out.append((i, adapter.validate_python(data)))
        except ValidationError:
            continue
    return out


def _trigger_problems(
    project: FlowerPowerProject, triggers: Iterable[tuple[int, Trigger]]
) -> list[ConfigProblem]:
    """Each trigger (with its index in the config) against the project's pipelines."""
    shown = "config"
    problems: list[ConfigProblem] = []
    for i, trig in triggers:
        key = f"triggers[{i}]"
        if trig.pipeline not in project.pipelines:
            if project.problems_for(trig.pipeline):
                continue  # already listed, with the pipeline file's own key path
            known = ", ".join(sorted(project.pipelines)) or "none"
            problems.append(
                ConfigProblem(
                    shown,
                    f"{key}.pipeline",
                    f"unknown pipeline {trig.pipeline!r} (pipelines: {known})",
                )
            )
            continue
        try:
            prepared = project.runner.prepare(trig.pipeline, trig.run)
        except FlowerPowerError as exc:
            problems.append(ConfigProblem(shown, f"{key}.pipeline", str(exc)))
            continue
        if isinstance(trig, FileTrigger):
            if not os.path.isdir(trig.path):
                problems.append(
                    ConfigProblem(shown, f"{key}.path", f"directory {trig.path!r} does not exist")
                )
        # Topic fields need not be inputs: they may only feed result-topic templates.
        unknown = [name for name in trig.inputs if name not in prepared.input_names]
        if unknown:
            detail = prepared.unknown_inputs_detail(unknown)
            problems.append(
                ConfigProblem(shown, f"{key}.inputs", f"pipeline {trig.pipeline!r}: {detail}")
            )
    return problems


def redis_policy_problems(settings: Settings) -> list[ConfigProblem]:
    """Run policies the Redis queue does not enforce, one problem per enabled trigger and key.

    With ``queue.broker`` on Redis the daemon enqueues and workers run what is
    enqueued: ``overlap`` other than ``allow``, ``max_concurrent``, and an MQTT
    trigger's ``max_concurrent_per_key`` and ``coalesce`` would be silently
    ignored, so the combination is refused instead. (``debounce`` applies
    before enqueueing and is fine.)
    """
    if not settings.queue.is_redis:
        return []
    why = "is not enforced with queue.broker on Redis (workers run what is enqueued)"
    problems: list[ConfigProblem] = []
    for i, trig in enumerate(settings.triggers):
        if not trig.enabled:
            continue
        used: list[tuple[str, str, str]] = []
        if trig.overlap != "allow":
            used.append(("overlap", repr(trig.overlap), "use overlap: allow"))
        if trig.max_concurrent is not None:
            used.append(("max_concurrent", str(trig.max_concurrent), "drop it"))
        if isinstance(trig, MqttTrigger):
            if trig.max_concurrent_per_key is not None:
                limit = str(trig.max_concurrent_per_key)
                used.append(("max_concurrent_per_key", limit, "drop it"))
            if trig.coalesce:
                used.append(("coalesce", "true", "drop it"))
        for key, value, fix in used:
            problems.append(
                ConfigProblem(
                    "config",
                    f"triggers[{i}].{key}",
                    f"{value} {why}; {fix} or use the memory queue",
                )
            )
    return problems


def shared_timer_warnings(settings: Settings, project: FlowerPowerProject) -> list[ConfigProblem]:
    """A warning when this daemon shares its MQTT messages with others (``shared_group``)
    but keeps its timers to itself: every daemon of the group would fire every tick.

    On the memory queue, timer state and locks are in the state dir unless
    ``shared_state`` names a Redis; with the queue on Redis they are there.
    """
    if settings.shared_redis is not None:
        return []
    shared = [
        i
        for i, t in enumerate(settings.triggers)
        if t.enabled and isinstance(t, MqttTrigger) and t.shared_group
    ]
    timers = [
        t.name
        for t in settings.triggers
        if t.enabled and isinstance(t, CronTrigger | IntervalTrigger | DateTrigger)
    ] + [t.name for t in schedule_triggers(settings, project)]
    if not shared or not timers:
        return []
    listed = ", ".join(timers[:5]) + (f" and {len(timers) - 5} more" if len(timers) > 5 else "")
    trig = settings.triggers[shared[0]]
    assert isinstance(trig, MqttTrigger)
    return [
        ConfigProblem(
            "config",
            f"triggers[{shared[0]}].shared_group",
            f"the daemons of shared group {trig.shared_group!r} would each fire every tick of"
            f" the timers ({listed}); set shared_state: redis://host:6379/0 (or put"
            " queue.broker on Redis) so that each tick fires once across them",
        )
    ]


def configured_triggers(settings: Settings, project: FlowerPowerProject) -> list[Trigger]:
    """The enabled triggers of the config file plus every pipeline's ``schedule:`` (and its
    Home Assistant button, with ``homeassistant.discovery`` on)."""
    triggers = [t for t in settings.triggers if t.enabled] + schedule_triggers(settings, project)
    if settings.homeassistant.discovery:
        from .homeassistant import button_triggers  # deferred: it imports the MQTT client

        triggers += button_triggers(settings, project)
    return triggers
