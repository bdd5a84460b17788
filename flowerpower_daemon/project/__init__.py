"""The FlowerPower project model and pipeline runner (no daemon parts in here)."""

from .api import FlowerPowerProject
from .config import PipelineConfig, ProjectConfig, RunConfig, ScheduleConfig
from .models import ErrorInfo, RunRequest, RunResult, TriggerInfo
from .registry import ProjectFiles, ProjectSpec
from .runner import PipelineRunner

__all__ = [
    "ErrorInfo",
    "FlowerPowerProject",
    "PipelineConfig",
    "PipelineRunner",
    "ProjectConfig",
    "ProjectFiles",
    "ProjectSpec",
    "RunConfig",
    "RunRequest",
    "RunResult",
    "ScheduleConfig",
    "TriggerInfo",
]
