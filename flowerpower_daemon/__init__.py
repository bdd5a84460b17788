"""flowerpower-daemon: run FlowerPower (Hamilton) pipelines on MQTT, timer and file events.

Importing the package starts nothing and imports neither Hamilton nor taskiq;
those load when a pipeline is built or the daemon starts. The project API
(``FlowerPowerProject`` and friends) is imported on first attribute access,
so light entry points such as ``flowerpowerctl`` never pay for pydantic,
fsspec or the project model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    ConfigProblem,
    DependencyMissingError,
    FlowerPowerError,
    InputError,
    PipelineExistsError,
    PipelineImportError,
    PipelineNotFoundError,
    RunTimeoutError,
)

if TYPE_CHECKING:
    from .project import (
        ErrorInfo,
        FlowerPowerProject,
        PipelineConfig,
        PipelineRunner,
        ProjectConfig,
        RunRequest,
        RunResult,
        TriggerInfo,
    )

from .version import __version__

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DependencyMissingError",
    "ErrorInfo",
    "FlowerPowerError",
    "FlowerPowerProject",
    "InputError",
    "PipelineConfig",
    "PipelineExistsError",
    "PipelineImportError",
    "PipelineNotFoundError",
    "PipelineRunner",
    "ProjectConfig",
    "RunRequest",
    "RunResult",
    "RunTimeoutError",
    "TriggerInfo",
    "__version__",
]

_LAZY = frozenset(
    {
        "ErrorInfo",
        "FlowerPowerProject",
        "PipelineConfig",
        "PipelineRunner",
        "ProjectConfig",
        "RunRequest",
        "RunResult",
        "TriggerInfo",
    }
)


def __getattr__(name: str) -> Any:
    """Import the project API on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(".project", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
