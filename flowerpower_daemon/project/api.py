"""``FlowerPowerProject``: the Python API over the project model and the runner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..argtypes import RUN_OVERRIDES
from ..errors import ConfigProblem, FlowerPowerError
from .config import PipelineConfig, ProjectConfig
from .models import RunRequest, RunResult, TriggerInfo, UnknownInputs, new_run_id, utcnow
from .registry import (
    ProjectFiles,
    ProjectSpec,
    delete_pipeline,
    init_project,
    load_spec,
    new_pipeline,
)
from .runner import PipelineRunner

__all__ = ["FlowerPowerProject", "build_overrides"]

#: The ``run:`` keys a request may override: the command line's (shared with flowerpowerctl,
#: which must not import this module) plus what only Python callers set.
_OVERRIDE_KEYS = (*RUN_OVERRIDES, "executor", "log_level", "reload")


_OVERRIDE_KEY_SET = frozenset(_OVERRIDE_KEYS)
_MANUAL = TriggerInfo()


def build_overrides(**values: object) -> dict[str, object]:
    """Keep the ``run:`` overrides that were actually given (``None`` means 'from YAML')."""
    if not values:
        return {}
    unknown = values.keys() - _OVERRIDE_KEY_SET
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in values.items() if v is not None}


class FlowerPowerProject:
    """A loaded, validated FlowerPower project and the runner for its pipelines.

    >>> project = FlowerPowerProject.load("examples/sensors")
    >>> project.run("stats", inputs={"readings": [1.0, 2.0]})["mean"]
    """

    def __init__(self, spec: ProjectSpec, runner: PipelineRunner | None = None) -> None:
        self._spec = spec
        self.runner = runner or PipelineRunner(spec, cache_dir=_default_cache_dir(spec.files))

    @classmethod
    def load(
        cls,
        base_dir: str = ".",
        *,
        storage_options: Mapping[str, object] | None = None,
        cache_dir: str | None = None,
    ) -> FlowerPowerProject:
        """Read and validate the project at ``base_dir`` (a path or fsspec URL).

        Raises ConfigError for a problem in ``conf/project.yml`` (listing every
        problem found). A pipeline whose own files have problems does not stop
        the others: it is left out of :attr:`pipelines`, its problems are in
        :meth:`problems_for`, and running or showing it raises them.
        """
        spec = load_spec(ProjectFiles(base_dir, storage_options))
        runner = PipelineRunner(spec, cache_dir=cache_dir or _default_cache_dir(spec.files))
        return cls(spec, runner)

    @classmethod
    def init(
        cls,
        name: str | None = None,
        base_dir: str = ".",
        *,
        storage_options: Mapping[str, object] | None = None,
    ) -> FlowerPowerProject:
        """Scaffold a project in ``base_dir/name`` and load it."""
        files = init_project(name, base_dir, storage_options)
        return cls.load(files.base_dir, storage_options=storage_options)

    @property
    def spec(self) -> ProjectSpec:
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.project.name

    @property
    def config(self) -> ProjectConfig:
        return self._spec.project

    @property
    def files(self) -> ProjectFiles:
        return self._spec.files

    @property
    def pipelines(self) -> Mapping[str, PipelineConfig]:
        """Every valid pipeline's config, by name (broken ones are in :attr:`problems`)."""
        return self._spec.pipelines

    @property
    def problems(self) -> list[ConfigProblem]:
        """The problems of every pipeline left out of :attr:`pipelines` (empty when all load)."""
        return self._spec.problems

    def problems_for(self, name: str) -> list[ConfigProblem]:
        """The problems that stop pipeline ``name``: its YAML's, or a YAML without a module."""
        return self._spec.problems_for(name)

    def reload(self) -> None:
        """Re-read every YAML file; on a project.yml problem keep the current config and raise."""
        self._spec = load_spec(self._spec.files)
        self.runner.update_spec(self._spec)

    def new(self, name: str, *, overwrite: bool = False) -> PipelineConfig:
        """Create a pipeline from the template and return its config."""
        new_pipeline(self.files, name, overwrite=overwrite)
        self.reload()
        return self.pipelines[name]

    def delete(self, name: str) -> list[str]:
        """Delete a pipeline's module and YAML (also a broken one); returns the removed paths."""
        if name not in self._spec.broken:
            self._spec.pipeline(name)
        removed = delete_pipeline(self.files, name)
        self.reload()
        return removed

    def show(self, name: str) -> dict[str, object]:
        """A pipeline's config and the nodes of its DAG."""
        from . import _hamilton

        cfg = self._spec.pipeline(name)
        prepared = self.runner.prepare(name)
        return {
            "name": name,
            "module": self.files.display(self.files.module_rel(name)),
            "config": cfg.model_dump(mode="json", exclude={"name"}),
            "async": prepared.is_async,
            "final_vars": list(prepared.final_vars),
            "nodes": _hamilton.describe_nodes(prepared.driver),
        }

    def request(
        self,
        name: str,
        inputs: Mapping[str, object] | None = None,
        *,
        trigger: TriggerInfo | None = None,
        unknown_inputs: UnknownInputs | None = None,
        traceback: bool = False,
        **run_options: object,
    ) -> RunRequest:
        """A :class:`RunRequest` for ``name`` with the given inputs and ``run:`` overrides.

        An input no node takes is an error unless ``unknown_inputs="ignore"``;
        ``traceback=True`` keeps a failing node's traceback in
        ``result.error.traceback``.
        """
        self._spec.pipeline(name)
        request = RunRequest(
            name,
            dict(inputs) if inputs else {},
            build_overrides(**run_options) if run_options else {},
            new_run_id(),
            trigger or _MANUAL,
            utcnow(),
        )
        if unknown_inputs is not None:
            request.unknown_inputs = unknown_inputs
        if traceback:
            request.traceback = True
        return request

    def execute(self, request: RunRequest) -> RunResult:
        """Run a request synchronously and return its full :class:`RunResult`."""
        return self.runner.run_sync(request)

    async def aexecute(self, request: RunRequest) -> RunResult:
        """Run a request from async code and return its full :class:`RunResult`."""
        return await self.runner.run(request)

    def run(
        self,
        name: str,
        inputs: Mapping[str, object] | None = None,
        *,
        final_vars: Sequence[str] | None = None,
        **run_options: Any,
    ) -> dict[str, Any]:
        """Run ``name`` and return its outputs; raises the run's error when it fails."""
        if final_vars is not None:
            run_options["final_vars"] = final_vars
        result = self.execute(self.request(name, inputs, **run_options))
        return _outputs_or_raise(result)

    async def arun(
        self,
        name: str,
        inputs: Mapping[str, object] | None = None,
        *,
        final_vars: Sequence[str] | None = None,
        **run_options: Any,
    ) -> dict[str, Any]:
        """Async :meth:`run`: sync pipelines run in a worker thread, async ones on the loop."""
        result = await self.aexecute(
            self.request(name, inputs, final_vars=final_vars, **run_options)
        )
        return _outputs_or_raise(result)


def _outputs_or_raise(result: RunResult) -> dict[str, Any]:
    if result.ok:
        out = result.outputs
        return out if type(out) is dict else dict(out)
    if result.exception is not None:
        raise result.exception
    raise FlowerPowerError(result.error.message if result.error else "run failed")


def _default_cache_dir(files: ProjectFiles) -> str:
    if files.is_local:
        return files.path(".hamilton_cache")
    import hashlib
    import os

    digest = hashlib.sha1(files.display("").encode()).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "flowerpower-daemon", digest)
