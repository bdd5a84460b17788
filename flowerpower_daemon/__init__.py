"""flowerpower-daemon: run FlowerPower (Hamilton) pipelines on MQTT, timer and file events.

Importing the package starts nothing and imports neither Hamilton nor taskiq;
those load when a pipeline is built or the daemon starts.
"""

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

__version__ = "0.1.0"

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
