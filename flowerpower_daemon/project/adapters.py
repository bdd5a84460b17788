"""The ``adapter:`` settings (Hamilton UI tracker, MLflow, OpenTelemetry, Ray) and ``with_adapter``.

``adapter:`` appears in ``project.yml``, in a pipeline's YAML and, as
FlowerPower writes it, in ``run.pipeline_adapter_cfg`` /
``run.project_adapter_cfg``; :meth:`AdapterConfig.merged` layers them. The
flags that switch adapters on for a run are ``run.with_adapter``
(:class:`WithAdapterConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pydantic import BaseModel, Field, field_validator, model_validator

from .fpkeys import Section, moved, without_nulls
from .tracking import check_run_name

__all__ = [
    "AdapterConfig",
    "HamiltonTrackerConfig",
    "MlflowConfig",
    "OpenTelemetryConfig",
    "RayConfig",
    "WithAdapterConfig",
]


class WithAdapterConfig(Section):
    """Flags that switch adapters on for a run (FlowerPower's ``with_adapter``).

    ``tracker`` is the older FlowerPower name of ``hamilton_tracker``.
    """

    older_keys: ClassVar[tuple[str, ...]] = ("tracker",)

    hamilton_tracker: bool = False
    mlflow: bool = False
    opentelemetry: bool = False
    progressbar: bool = False
    ray: bool = False
    future: bool = False

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, value: object) -> object:
        return moved(value, "tracker", "hamilton_tracker")

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name, on in self.model_dump().items() if on)


class HamiltonTrackerConfig(Section):
    """The Hamilton UI tracker (``hamilton_sdk``) settings.

    ``capture_*`` bound what the tracker records of each node's result
    (statistics at all, list items, dict items); FlowerPower's defaults, not
    the SDK's (which keeps 100 dict items), and per pipeline: see
    :mod:`.uitracker`.
    """

    username: str | None = None
    api_url: str | None = None
    ui_url: str | None = None
    api_key: str | None = None
    verify: bool = True
    project_id: int | None = None
    dag_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    capture_data_statistics: bool = True
    max_list_length_capture: int = Field(default=50, ge=0)
    max_dict_length_capture: int = Field(default=10, ge=0)


class MlflowConfig(Section):
    """MLflow settings; FlowerPower's ``run_tags`` are our ``tags`` (``tags`` win on a clash).

    ``run_name`` may hold placeholders (:data:`.tracking.RUN_NAME_PLACEHOLDERS`),
    filled in per run; an unknown one is an error here, when the file loads.
    """

    older_keys: ClassVar[tuple[str, ...]] = ("run_tags",)

    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment_name: str | None = None
    experiment_tags: dict[str, object] = Field(default_factory=dict)
    experiment_description: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    run_description: str | None = None
    tags: dict[str, object] = Field(default_factory=dict)
    autolog: bool = False

    @field_validator("run_name")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is not None:
            problem = check_run_name(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _run_tags(cls, value: object) -> object:
        if isinstance(value, Mapping) and "run_tags" in value:
            data = dict(value)
            run_tags = data.pop("run_tags")
            if run_tags is not None:
                tags = data.get("tags")
                if isinstance(run_tags, Mapping) and isinstance(tags, Mapping | None):
                    data["tags"] = {**run_tags, **(tags or {})}
                else:
                    # Let the model report the bad value at ``tags``.
                    data["tags"] = run_tags
            return data
        return value


class OpenTelemetryConfig(Section):
    """Where ``with_adapter.opentelemetry`` sends a pipeline's spans: OTLP to ``host:port``
    (gRPC unless ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``), as tracer ``tracer_name``
    (default: the pipeline's name)."""

    host: str = "localhost"
    port: int = 4317
    tracer_name: str | None = None


class RayConfig(Section):
    """How Ray is started for ``executor.type: ray``."""

    ray_init_config: dict[str, object] = Field(default_factory=dict)
    shutdown_ray_on_completion: bool = False


class AdapterConfig(Section):
    """Adapter settings, project-wide or per pipeline (pipeline keys win).

    ``tracker`` is the older FlowerPower name of ``hamilton_tracker``.
    """

    older_keys: ClassVar[tuple[str, ...]] = ("tracker",)

    hamilton_tracker: HamiltonTrackerConfig = Field(default_factory=HamiltonTrackerConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    opentelemetry: OpenTelemetryConfig = Field(default_factory=OpenTelemetryConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, value: object) -> object:
        return moved(without_nulls(value, cls), "tracker", "hamilton_tracker")

    def merged(self, override: AdapterConfig) -> AdapterConfig:
        """These settings updated by the keys ``override`` actually set (``null`` sets none)."""
        data = self.model_dump()
        for section in override.model_fields_set:
            part: BaseModel = getattr(override, section)
            data[section] = {**data[section], **part.model_dump(include=part.model_fields_set)}
        return AdapterConfig.model_validate(data)
