"""Project files on any fsspec filesystem: discover, load, init, new, delete pipelines.

A project lives at a local path or any fsspec URL (``memory://proj`` in
tests, ``s3://bucket/proj`` in production). Every file access goes through
:class:`ProjectFiles`, so nothing here assumes a local disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from ..errors import ConfigError, ConfigProblem, PipelineExistsError, PipelineNotFoundError
from .config import (
    PipelineConfig,
    ProjectConfig,
    load_yaml_text,
    validate_model,
    warn_no_effect,
)
from .templates import (
    PIPELINE_MODULE_TEMPLATE,
    PIPELINE_YAML_TEMPLATE,
    PROJECT_README_TEMPLATE,
    PROJECT_YAML_TEMPLATE,
)

__all__ = [
    "PipelineNameError",
    "ProjectFiles",
    "ProjectSpec",
    "existing_pipeline_file",
    "init_project",
    "load_spec",
    "missing_scaffold",
    "validate_pipeline_name",
]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROJECT_YML = "conf/project.yml"
PIPELINES_CONF = "conf/pipelines"
PIPELINES_DIR = "pipelines"
HOOKS_DIR = "hooks"


class PipelineNameError(ConfigError):
    """A pipeline name that is not a Python identifier: one line, no file to name."""

    def __init__(self, name: str) -> None:
        self.message = (
            f"invalid pipeline name {name!r}: a pipeline name is a Python identifier "
            "(letters, digits and _, not starting with a digit)"
        )
        super().__init__([ConfigProblem("", "name", self.message)])

    def __str__(self) -> str:
        return self.message


def validate_pipeline_name(name: str) -> str:
    """Pipeline names are Python identifiers (they name a module); PipelineNameError if not."""
    if not _NAME_RE.match(name):
        raise PipelineNameError(name)
    return name


class ProjectFiles:
    """The files of one project, addressed relative to its root."""

    def __init__(self, base_dir: str, storage_options: Mapping[str, object] | None = None) -> None:
        self.base_dir = base_dir
        self.fs, root = fsspec.core.url_to_fs(base_dir, **dict(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.is_local = "file" in _protocols(self.fs)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str) -> str:
        """A path for messages and tracebacks: absolute locally, a URL elsewhere."""
        if self.is_local:
            return self.path(rel)
        return f"{_protocols(self.fs)[0]}://{self.path(rel).lstrip('/')}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def read_text(self, rel: str) -> str:
        with self.fs.open(self.path(rel), "r", encoding="utf-8") as fh:
            return str(fh.read())

    def write_text(self, rel: str, text: str) -> None:
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(self.path(rel), "w", encoding="utf-8") as fh:
            fh.write(text)

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        self.fs.rm(self.path(rel))

    def signature(self, rel: str) -> tuple[object, str]:
        """Cheap change detector for a file: size and modification time."""
        info = self.fs.info(self.path(rel))
        stamp = info.get("mtime") or info.get("created") or info.get("LastModified")
        return (info.get("size"), str(stamp))

    def names(self, rel_dir: str, suffix: str) -> list[str]:
        if not self.exists(rel_dir):
            return []
        out = []
        for entry in self.fs.ls(self.path(rel_dir), detail=False):
            base = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(suffix) and not base.startswith(("_", ".")):
                out.append(base[: -len(suffix)])
        return sorted(out)

    def module_rel(self, name: str) -> str:
        return f"{PIPELINES_DIR}/{name}.py"

    def config_rel(self, name: str) -> str:
        return f"{PIPELINES_CONF}/{name}.yml"

    def pipeline_names(self) -> list[str]:
        """Pipelines that have a module (a YAML file alone is reported by ``load_spec``)."""
        return self.names(PIPELINES_DIR, ".py")


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


@dataclass(frozen=True, slots=True)
class ProjectSpec:
    """A validated project: its config, every valid pipeline's config, and the broken ones.

    A pipeline whose own files have problems (its YAML, or a YAML without a
    module) is in ``broken`` with those problems, not in ``pipelines``: it
    fails alone, and every other pipeline still loads and runs.
    """

    files: ProjectFiles
    project: ProjectConfig
    pipelines: Mapping[str, PipelineConfig]
    broken: Mapping[str, tuple[ConfigProblem, ...]] = field(default_factory=dict)

    @property
    def problems(self) -> list[ConfigProblem]:
        """Every problem of every broken pipeline, in name order."""
        return [p for name in sorted(self.broken) for p in self.broken[name]]

    def problems_for(self, name: str) -> list[ConfigProblem]:
        """The problems that stop pipeline ``name`` (none when it is valid or unknown)."""
        return list(self.broken.get(name, ()))

    def pipeline(self, name: str) -> PipelineConfig:
        """The config of ``name``; ConfigError naming its files when they have problems."""
        try:
            return self.pipelines[name]
        except KeyError:
            pass
        if name in self.broken:
            raise ConfigError(self.broken[name])
        raise PipelineNotFoundError(name, [*self.pipelines, *self.broken])


def load_spec(files: ProjectFiles) -> ProjectSpec:
    """Read and validate ``project.yml`` and every pipeline YAML.

    A problem in ``project.yml`` stops the whole project: ConfigError lists it
    with every pipeline's problems. A pipeline's own problems only put it in
    :attr:`ProjectSpec.broken`. Keys accepted without effect are warned about
    once per process (:func:`~.noeffect.warn_no_effect`).
    """
    if not files.exists(PROJECT_YML) and not files.exists(PIPELINES_DIR):
        raise ConfigError(
            [
                ConfigProblem(
                    files.display(""),
                    "",
                    "not a FlowerPower project (no conf/project.yml, no pipelines/); "
                    "create one with: flowerpower-daemon init",
                )
            ]
        )
    project_problems: list[ConfigProblem] = []
    project = ProjectConfig()
    project_data: dict[str, object] = {}
    if files.exists(PROJECT_YML):
        shown = files.display(PROJECT_YML)
        project_data, found = load_yaml_text(files.read_text(PROJECT_YML), shown)
        project_problems += found
        project_model, found = validate_model(ProjectConfig, project_data, shown)
        project_problems += found
        project = project_model or project
    pipelines: dict[str, PipelineConfig] = {}
    broken: dict[str, tuple[ConfigProblem, ...]] = {}
    valid_data: dict[str, tuple[str, dict[str, object]]] = {}
    modules = set(files.pipeline_names())
    for name in sorted(modules | set(files.names(PIPELINES_CONF, ".yml"))):
        rel = files.config_rel(name)
        shown = files.display(rel)
        if name not in modules:
            missing = f"no module {files.module_rel(name)} for pipeline {name!r}"
            broken[name] = (ConfigProblem(shown, "", missing),)
            continue
        own: list[ConfigProblem] = []
        data: dict[str, object] = {}
        if files.exists(rel):
            data, own = load_yaml_text(files.read_text(rel), shown)
        model, found = validate_model(PipelineConfig, {**data, "name": name}, shown)
        own += found
        if own or model is None:
            broken[name] = tuple(own)
            continue
        merged = model.effective_adapter(project.adapter)
        pipelines[name] = model.model_copy(update={"adapter": merged})
        valid_data[name] = (shown, data)
    if project_problems:
        raise ConfigError([*project_problems, *(p for n in sorted(broken) for p in broken[n])])
    warn_no_effect(project_data, files.display(PROJECT_YML))
    for shown, data in valid_data.values():
        warn_no_effect(data, shown)
    return ProjectSpec(files=files, project=project, pipelines=pipelines, broken=broken)


#: The directories a project has (``init`` makes them).
_PROJECT_DIRS = (PIPELINES_CONF, PIPELINES_DIR, HOOKS_DIR)


def _scaffold_files(name: str) -> dict[str, str]:
    """The files ``init`` writes where they are missing: relative path -> text."""
    return {
        PROJECT_YML: PROJECT_YAML_TEMPLATE.format(
            name=yaml.safe_dump(name).strip().removesuffix("...").strip()
        ),
        f"{PIPELINES_DIR}/__init__.py": "",
        f"{HOOKS_DIR}/__init__.py": "",
        "README.md": PROJECT_README_TEMPLATE.format(name=name),
    }


def missing_scaffold(files: ProjectFiles) -> list[str]:
    """What :func:`init_project` would add to the project ``files`` (directories end in ``/``).

    Lets ``init`` on an existing project say what it re-created, if anything.
    """
    missing = [f"{rel}/" for rel in _PROJECT_DIRS if not files.exists(rel)]
    missing += [rel for rel in _scaffold_files("") if not files.exists(rel)]
    return missing


def init_project(
    name: str | None = None,
    base_dir: str = ".",
    storage_options: Mapping[str, object] | None = None,
) -> ProjectFiles:
    """Scaffold a project in ``base_dir/name`` (reusing an existing directory).

    Never scatters files into ``base_dir`` itself. Existing files are kept.
    """
    if name is None:
        name = os.path.basename(os.path.abspath(base_dir)) if "://" not in base_dir else "project"
    target = base_dir.rstrip("/") + "/" + name
    files = ProjectFiles(target, storage_options)
    for rel in _PROJECT_DIRS:
        files.makedirs(rel)
    for rel, text in _scaffold_files(name).items():
        if not files.exists(rel):
            files.write_text(rel, text)
    return files


def existing_pipeline_file(files: ProjectFiles, name: str) -> str | None:
    """The file of pipeline ``name`` that already exists (module first, then YAML), shown
    as :meth:`ProjectFiles.display` does; ``None`` when neither does."""
    for rel in (files.module_rel(name), files.config_rel(name)):
        if files.exists(rel):
            return files.display(rel)
    return None


def new_pipeline(files: ProjectFiles, name: str, *, overwrite: bool = False) -> None:
    """Write ``pipelines/<name>.py`` (a working template) and its YAML."""
    validate_pipeline_name(name)
    module_rel, conf_rel = files.module_rel(name), files.config_rel(name)
    existing = None if overwrite else existing_pipeline_file(files, name)
    if existing is not None:
        raise PipelineExistsError(
            f"pipeline {name!r} already exists ({existing}); pass overwrite=True to replace it"
        )
    files.write_text(module_rel, PIPELINE_MODULE_TEMPLATE.format(name=name))
    files.write_text(conf_rel, PIPELINE_YAML_TEMPLATE.format(name=name))


def delete_pipeline(files: ProjectFiles, name: str) -> list[str]:
    """Remove a pipeline's module and YAML; returns the paths removed."""
    removed = []
    for rel in (files.module_rel(name), files.config_rel(name)):
        if files.exists(rel):
            files.remove(rel)
            removed.append(files.display(rel))
    if not removed:
        raise PipelineNotFoundError(name, files.pipeline_names())
    return removed
