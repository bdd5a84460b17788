"""Import pipeline modules from project files on any fsspec filesystem.

Modules are compiled from their source text (so ``memory://`` and remote
projects work) under a unique name per project, registered in
``sys.modules`` (so process pools can pickle their functions by reference)
and in ``linecache`` (so tracebacks, ``inspect.getsource`` and Hamilton's
cache fingerprints see the real source). Importing one also makes
``from flowerpower.cfg import Config`` work where FlowerPower is not
installed (see :mod:`.fpcompat`).
"""

from __future__ import annotations

import hashlib
import importlib
import linecache
import sys
import traceback
import types
from typing import TYPE_CHECKING

from ..errors import PipelineImportError
from . import fpcompat
from .registry import ProjectFiles

if TYPE_CHECKING:
    from .registry import ProjectSpec

__all__ = ["import_callable", "import_pipeline_module", "module_name_for"]


def module_name_for(files: ProjectFiles, name: str) -> str:
    digest = hashlib.sha1(files.display("").encode()).hexdigest()[:10]
    return f"flowerpower_daemon._pipelines.p{digest}.{name}"


def _ensure_parents(dotted: str) -> None:
    parts = dotted.split(".")
    for i in range(2, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            pkg = types.ModuleType(parent)
            pkg.__path__ = []
            sys.modules[parent] = pkg


def import_pipeline_module(
    files: ProjectFiles, rel: str, module_name: str, spec: ProjectSpec | None = None
) -> types.ModuleType:
    """Execute ``rel`` as a fresh module named ``module_name``.

    ``spec`` is the loaded project the module belongs to: FlowerPower's
    ``Config.load`` of that project in the module reads it. Errors name the
    file and line: a syntax error, or the line of the module that raised
    while importing.
    """
    shown = files.display(rel)
    try:
        source = files.read_text(rel)
    except FileNotFoundError:
        raise PipelineImportError(f"{shown}: module file not found") from None
    try:
        # dont_inherit: this file's ``from __future__ import annotations`` must not leak
        # into the pipeline module (its annotations would all become strings).
        code = compile(source, shown, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PipelineImportError(f"{shown}:{exc.lineno}: syntax error: {exc.msg}") from None
    linecache.cache[shown] = (len(source), None, source.splitlines(True), shown)
    module = types.ModuleType(module_name)
    module.__file__ = shown
    _ensure_parents(module_name)
    if files.is_local and files.root not in sys.path:
        # Lets pipeline modules import their siblings (``from pipelines import util``),
        # as in FlowerPower.
        sys.path.insert(0, files.root)
    fpcompat.install()
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module
    try:
        with fpcompat.importing(spec):
            exec(code, module.__dict__)
    except Exception as exc:
        if previous is not None:
            sys.modules[module_name] = previous
        else:
            sys.modules.pop(module_name, None)
        frames = reversed(traceback.extract_tb(exc.__traceback__))
        line = next((f.lineno for f in frames if f.filename == shown), None)
        raise PipelineImportError(
            f"{shown}:{line}: importing the module raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def import_callable(path: str) -> object:
    """Resolve ``package.module.function`` or ``package.module:function``."""
    module_path, sep, attr = path.partition(":")
    if not sep:
        module_path, _, attr = path.rpartition(".")
    if not module_path or not attr:
        raise ImportError(f"{path!r} is not a dotted path to a function")
    module = importlib.import_module(module_path)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_path!r} has no attribute {attr!r}") from None
