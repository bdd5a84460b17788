"""What ``flowerpower-daemon check`` and a reload validate: the project and every
trigger against its pipeline, all problems at once.

Apart from the daemon so that ``reload`` can use it without importing the daemon.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, ConfigProblem, FlowerPowerError
from ..project.api import FlowerPowerProject
from ..settings import CronTrigger, DateTrigger, FileTrigger, IntervalTrigger, Settings

__all__ = ["check", "configured_triggers", "schedule_triggers"]


def schedule_triggers(settings: Settings, project: FlowerPowerProject) -> list[Any]:
    """Every pipeline's ``schedule:`` as a timer trigger (FlowerPower's ``schedule_all``)."""
    if not settings.schedule_all:
        return []
    out: list[Any] = []
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


def check(settings: Settings) -> list[ConfigProblem]:
    """Validate the project and every trigger against its pipeline; return all problems."""
    shown = "config"
    try:
        project = FlowerPowerProject.load(
            settings.project, storage_options=settings.storage_options
        )
    except ConfigError as exc:
        return exc.problems
    except FlowerPowerError as exc:
        return [ConfigProblem(shown, "project", str(exc))]
    problems: list[ConfigProblem] = list(project.problems)
    for i, trig in enumerate(settings.triggers):
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
        known_inputs = set(prepared.dag.inputs)
        # Topic fields need not be inputs: they may only feed result-topic templates.
        names = dict.fromkeys(trig.inputs, f"{key}.inputs")
        if isinstance(trig, FileTrigger):
            if not os.path.isdir(trig.path):
                problems.append(
                    ConfigProblem(shown, f"{key}.path", f"directory {trig.path!r} does not exist")
                )
        for name, where in names.items():
            if name not in known_inputs:
                problems.append(
                    ConfigProblem(
                        shown,
                        where,
                        f"{name!r} is not an input of pipeline {trig.pipeline!r} "
                        f"(inputs: {', '.join(sorted(known_inputs)) or 'none'})",
                    )
                )
    return problems


def configured_triggers(settings: Settings, project: FlowerPowerProject) -> list[Any]:
    """The enabled triggers of the config file plus every pipeline's ``schedule:``."""
    return [t for t in settings.triggers if t.enabled] + schedule_triggers(settings, project)
