"""``flowerpower.cfg`` for pipeline modules written for FlowerPower, when it is not installed.

FlowerPower's pipeline template reads its parameters at import time::

    from flowerpower.cfg import Config
    PARAMS = Config.load(base_dir, pipeline_name="hello", ...).pipeline.h_params

When the ``flowerpower`` package cannot be imported, :class:`ShimFinder`
(appended at the *end* of ``sys.meta_path`` by :func:`install`, so a real
installed FlowerPower always wins) resolves ``flowerpower`` and
``flowerpower.cfg`` to this module's :class:`Config`, built from this
daemon's own config model: the same ``${VAR}`` expansion and filesystems as
every run. ``h_params`` is FlowerPower 0.37's ``PipelineConfig.to_h_params``
(each param ``k`` becomes ``{k: {k: ...}}``, depth-3 values wrapped in
Hamilton's ``value()``, strings naming another param in ``source()``), as a
:class:`DictNamespace` (attribute and item access), so
``@parameterize(**PARAMS.name)`` builds the same nodes as under FlowerPower.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.abc
import importlib.machinery
import os
import re
import sys
import types
from collections.abc import Iterator, KeysView, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .registry import PROJECT_YML, ProjectFiles, ProjectSpec, load_spec

if TYPE_CHECKING:
    from .config import PipelineConfig

__all__ = [
    "AttrDict",
    "Config",
    "DictNamespace",
    "PipelineView",
    "ShimFinder",
    "importing",
    "install",
    "load",
    "to_h_params",
]

#: The project whose pipeline module is being imported (set by ``modules.py``):
#: ``Config.load`` on that project's directory reads the runner's own validated spec.
_IMPORTING: contextvars.ContextVar[ProjectSpec | None] = contextvars.ContextVar(
    "flowerpower_daemon_importing", default=None
)


class DictNamespace(types.SimpleNamespace, Mapping[str, Any]):
    """Attribute and item access over nested dicts, as FlowerPower 0.37's ``h_params``."""

    def __getitem__(self, key: str) -> Any:
        try:
            return self.__dict__[key]
        except KeyError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        yield from self.__dict__

    def __len__(self) -> int:
        return len(self.__dict__)

    def keys(self) -> KeysView[str]:
        return self.__dict__.keys()

    def to_dict(self) -> dict[str, object]:
        """A plain, recursively converted dict."""
        return {k: _plain(v) for k, v in self.__dict__.items()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


class AttrDict(dict[str, Any]):
    """A dict whose keys are also attributes (``params.x``, as FlowerPower's munch era had)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _plain(value: object) -> object:
    if isinstance(value, DictNamespace):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _namespace_of(data: Mapping[str, object]) -> DictNamespace:
    ns = DictNamespace()
    for key, item in data.items():
        ns.__dict__[key] = _namespace(item)
    return ns


def _namespace(value: object) -> object:
    if isinstance(value, Mapping):
        return _namespace_of(value)
    if isinstance(value, list):
        return [_namespace(v) for v in value]
    return value


def _attrdict_of(data: Mapping[str, object]) -> AttrDict:
    return AttrDict({k: _attrdict(v) for k, v in data.items()})


def _attrdict(value: object) -> object:
    if isinstance(value, Mapping):
        return _attrdict_of(value)
    if isinstance(value, list):
        return [_attrdict(v) for v in value]
    return value


def to_h_params(params: Mapping[str, object]) -> DictNamespace:
    """FlowerPower 0.37's ``PipelineConfig.to_h_params``: params in ``@parameterize`` form."""
    from hamilton.function_modifiers import source, value

    def transform(val: object, depth: int) -> object:
        if isinstance(val, Mapping):
            if depth == 3:
                return value(val)
            return {k: transform(v, depth + 1) for k, v in val.items()}
        if isinstance(val, str) and val in params:
            return source(val)
        if depth == 3:
            return value(val)
        return val

    return _namespace_of({k: transform({k: v}, 1) for k, v in params.items()})


class PipelineView:
    """``Config.pipeline``: a pipeline's ``name``, ``params``, ``h_params``, ``run``...

    ``params`` is a dict with attribute access; ``h_params`` (also under its
    older name ``hamilton_func_params``) the ``@parameterize`` form; ``run``,
    ``schedule`` and ``adapter`` the validated sections as namespaces.
    """

    def __init__(self, name: str | None, cfg: PipelineConfig | None) -> None:
        params: Mapping[str, object] = cfg.params if cfg is not None else {}
        self.name = name
        self.params = _attrdict_of(params)
        self.h_params = to_h_params(params)
        self.hamilton_func_params = self.h_params
        dumped = cfg.model_dump(mode="python") if cfg is not None else {}
        self.run = _namespace_of(dumped.get("run", {}))
        self.schedule = _namespace_of(dumped.get("schedule", {}))
        self.adapter = _namespace_of(dumped.get("adapter", {}))

    def __repr__(self) -> str:
        return f"PipelineView(name={self.name!r}, params={dict(self.params)!r})"


class Config:
    """``flowerpower.cfg.Config``: ``.pipeline`` and ``.project`` of a project's config."""

    def __init__(
        self, base_dir: str, pipeline: PipelineView, project: DictNamespace, fs: object = None
    ) -> None:
        self.base_dir = base_dir
        self.pipeline = pipeline
        self.project = project
        self.fs = fs

    @classmethod
    def load(
        cls,
        base_dir: str | os.PathLike[str] = ".",
        name: str | None = None,
        pipeline_name: str | None = None,
        fs: object = None,
        storage_options: Mapping[str, object] | None = None,
        cfg_dir: str | None = None,
        pipelines_dir: str | None = None,
    ) -> Config:
        """Read the project at ``base_dir`` with this daemon's loader (FlowerPower's arguments).

        The project whose module is being imported is read from the runner's
        spec, so the module sees exactly the config its runs use.
        """
        for key, given, layout in (
            ("cfg_dir", cfg_dir, "conf"),
            ("pipelines_dir", pipelines_dir, "pipelines"),
        ):
            if given not in (None, "", layout):
                raise ValueError(
                    f"Config.load: {key}={given!r} is not supported here; projects use {layout}/"
                )
        spec = _spec_for(os.fspath(base_dir), storage_options)
        cfg = spec.pipeline(pipeline_name) if pipeline_name is not None else None
        project = _namespace_of(spec.project.model_dump(mode="python"))
        if name is not None and not spec.files.exists(PROJECT_YML):
            project.__dict__["name"] = name  # as FlowerPower: the name of a project without one
        return cls(os.fspath(base_dir), PipelineView(pipeline_name, cfg), project, fs)


def load(
    base_dir: str | os.PathLike[str],
    name: str | None = None,
    pipeline_name: str | None = None,
    storage_options: Mapping[str, object] | None = None,
    fs: object = None,
    cfg_dir: str | None = None,
    pipelines_dir: str | None = None,
) -> Config:
    """``flowerpower.cfg.load``: a wrapper around :meth:`Config.load`."""
    return Config.load(
        base_dir, name, pipeline_name, fs, storage_options, cfg_dir, pipelines_dir
    )


def _norm(place: str) -> str:
    """A project location with repeated slashes folded (``Path`` turns ``memory://x`` into
    ``memory:/x``) and no trailing slash."""
    return re.sub(r"/+", "/", place).rstrip("/")


def _same_project(spec: ProjectSpec, base_dir: str) -> bool:
    files = spec.files
    if files.is_local and "://" not in base_dir:
        return os.path.realpath(base_dir) == os.path.realpath(files.root)
    return _norm(base_dir) == _norm(files.display(""))


def _spec_for(base_dir: str, storage_options: Mapping[str, object] | None) -> ProjectSpec:
    current = _IMPORTING.get()
    if current is not None and _same_project(current, base_dir):
        return current
    return load_spec(ProjectFiles(base_dir, storage_options))


@contextlib.contextmanager
def importing(spec: ProjectSpec | None) -> Iterator[None]:
    """Mark ``spec`` as the project whose module is being imported."""
    token = _IMPORTING.set(spec)
    try:
        yield
    finally:
        _IMPORTING.reset(token)


_SHIM_MARK = "__flowerpower_daemon_shim__"
_CFG_NAMES = ("Config", "DictNamespace", "load")


class _ShimLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        setattr(module, _SHIM_MARK, True)
        if module.__name__ == "flowerpower":
            module.__doc__ = "flowerpower-daemon's stand-in: FlowerPower is not installed."
            return
        this = sys.modules[__name__]
        for attr in _CFG_NAMES:
            setattr(module, attr, getattr(this, attr))


class ShimFinder(importlib.abc.MetaPathFinder):
    """Finds ``flowerpower`` and ``flowerpower.cfg`` when no other finder does."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "flowerpower":
            return importlib.machinery.ModuleSpec(fullname, _ShimLoader(), is_package=True)
        if fullname == "flowerpower.cfg":
            parent = sys.modules.get("flowerpower")
            if parent is not None and getattr(parent, _SHIM_MARK, False):
                return importlib.machinery.ModuleSpec(fullname, _ShimLoader())
        return None


def install() -> None:
    """Append :class:`ShimFinder` to ``sys.meta_path`` once (last: it never shadows)."""
    if not any(isinstance(f, ShimFinder) for f in sys.meta_path):
        sys.meta_path.append(ShimFinder())
