"""Factories for throw-away FlowerPower projects, on local disk or in ``memory://``."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from flowerpower_daemon.project import FlowerPowerProject, PipelineRunner
from flowerpower_daemon.project.registry import ProjectFiles, load_spec

_MODULE_PREFIX = "flowerpower_daemon._pipelines."


def _text(value: str | Mapping[str, Any]) -> str:
    if isinstance(value, str):
        return textwrap.dedent(value)
    return yaml.safe_dump(dict(value), sort_keys=False)


@dataclass
class ProjectFactory:
    """Writes projects into ``tmp_path`` (or a unique ``memory://`` URL) and loads them.

    ``make(modules={"name": source}, configs={"name": yaml_or_dict})`` returns the
    project's base dir; ``load(...)`` also returns a :class:`FlowerPowerProject`
    whose runner checks module files on every run (``check_interval=0``) and
    keeps its Hamilton cache under ``tmp_path``.
    """

    tmp_path: Path
    created: list[str] = field(default_factory=list)
    memory_urls: list[str] = field(default_factory=list)

    def make(
        self,
        modules: Mapping[str, str],
        configs: Mapping[str, str | Mapping[str, Any]] | None = None,
        *,
        project: str | Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        memory: bool = False,
    ) -> str:
        if memory:
            base = self.memory_url() + "/project"
        else:
            base = str(self.tmp_path / f"project-{uuid.uuid4().hex[:8]}")
        pf = ProjectFiles(base)
        pf.write_text("conf/project.yml", _text(project or {"name": "test-project"}))
        pf.write_text("pipelines/__init__.py", "")
        for name, source in modules.items():
            pf.write_text(pf.module_rel(name), textwrap.dedent(source))
        for name, conf in (configs or {}).items():
            pf.write_text(pf.config_rel(name), _text(conf))
        for rel, text in (files or {}).items():
            pf.write_text(rel, textwrap.dedent(text))
        self.created.append(base)
        return base

    def memory_url(self) -> str:
        """A fresh ``memory://`` directory URL, removed after the test."""
        url = f"memory://fp-test-{uuid.uuid4().hex}"
        self.memory_urls.append(url)
        return url

    def load(
        self,
        modules: Mapping[str, str],
        configs: Mapping[str, str | Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> FlowerPowerProject:
        return self.open(self.make(modules, configs, **kwargs))

    def open(self, base: str, *, check_interval: float = 0.0) -> FlowerPowerProject:
        spec = load_spec(ProjectFiles(base))
        runner = PipelineRunner(
            spec,
            cache_dir=str(self.tmp_path / f"cache-{uuid.uuid4().hex[:8]}"),
            check_interval=check_interval,
        )
        return FlowerPowerProject(spec, runner)

    def write(self, base: str, rel: str, text: str) -> None:
        """Rewrite one file of a project (e.g. to change a module's source)."""
        ProjectFiles(base).write_text(rel, textwrap.dedent(text))


@pytest.fixture
def projects(tmp_path: Path) -> Iterator[ProjectFactory]:
    """A :class:`ProjectFactory`; removes the projects' modules, paths and memory files after."""
    factory = ProjectFactory(tmp_path)
    modules_before = set(sys.modules)
    path_before = list(sys.path)
    yield factory
    for name in set(sys.modules) - modules_before:
        module_file = str(getattr(sys.modules[name], "__file__", None) or "")
        if name.startswith(_MODULE_PREFIX) or module_file.startswith(str(tmp_path)):
            del sys.modules[name]
    sys.path[:] = path_before
    memfs = fsspec.filesystem("memory")
    for url in factory.memory_urls:
        root = url.removeprefix("memory://").split("/", 1)[0]
        if memfs.exists(f"/{root}"):
            memfs.rm(f"/{root}", recursive=True)


@dataclass(frozen=True)
class CallLog:
    """A file that pipeline nodes append a word to, so tests can count node calls."""

    path: Path

    def lines(self) -> list[str]:
        return self.path.read_text().split()

    def count(self, word: str) -> int:
        return self.lines().count(word)


@pytest.fixture
def call_log(tmp_path: Path) -> Callable[[str], CallLog]:
    """Makes :class:`CallLog` files under ``tmp_path``; embed ``str(log.path)`` in a module."""

    def make(name: str) -> CallLog:
        path = tmp_path / f"{name}.calls"
        path.touch()
        return CallLog(path)

    return make
