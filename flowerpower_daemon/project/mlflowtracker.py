"""MLflow tracking of daemon runs through Hamilton's ``MLFlowTracker``, one MLflow run per run.

Imported only when ``with_adapter.mlflow`` is on (it imports mlflow:
``pip install 'flowerpower-daemon[mlflow]'``). Hamilton's tracker keeps the
MLflow run it is logging to in its own attributes, so one instance cannot
serve the concurrent runs of a shared driver, and its run name is fixed when
it is made. :class:`MlflowRuns` is the adapter the driver gets: it makes one
``MLFlowTracker`` per run, named from ``adapter.mlflow.run_name`` with the
placeholders filled in for that run (:func:`.tracking.fill_run_name`),
tagged with the configured tags plus the trigger (:func:`.tracking.run_tags`),
and hands it that run's hooks.

Final vars that are numbers become metrics and data savers' files
artifacts, as Hamilton logs them; every other final var is logged here as a
JSON artifact ``<name>.json`` (text ``<name>.txt`` for a string), where
Hamilton's tracker would first pickle it to a file in the working directory.

MLflow's fluent API (``mlflow.log_*`` in a node, autologging) logs to the
process's tracking URI: ``tracking_uri`` sets it at the start of each run,
so one tracking URI per daemon process is what works with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
from hamilton import registry
from hamilton.lifecycle import GraphConstructionHook, GraphExecutionHook, NodeExecutionHook
from hamilton.plugins import h_mlflow

from .adapters import MlflowConfig
from .tracking import current, fill_run_name, run_tags

__all__ = ["MlflowRuns"]

# _hamilton.py leaves Hamilton's mlflow plugin (the ``to.mlflow`` / ``from_.mlflow``
# materializers) out of its autoload; with the tracker on, mlflow is loaded anyway.
registry.load_extension("mlflow")

_autolog_lock = threading.Lock()
_autolog_on = False


def _autolog() -> None:
    """Switch on ``mlflow.autolog()`` once per process (autologging is process-wide)."""
    global _autolog_on
    with _autolog_lock:
        if not _autolog_on:
            mlflow.autolog()
            _autolog_on = True


@dataclass(slots=True)
class _Run:
    """One run in progress: its Hamilton tracker, and what is left to log at the end."""

    tracker: Any  # h_mlflow.MLFlowTracker
    #: Whether it is MLflow's active (fluent) run in its thread (_start_without_fluent_run).
    fluent: bool
    #: Final vars of the async driver: (node, return type, node tags, hook kwargs).
    deferred: list[tuple[str, type, dict[str, Any], dict[str, Any]]] = field(default_factory=list)


class MlflowRuns(GraphConstructionHook, GraphExecutionHook, NodeExecutionHook):  # type: ignore[misc]
    """A Hamilton adapter that logs each run of its driver as one MLflow run."""

    def __init__(self, settings: MlflowConfig, pipeline: str) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._experiment = settings.experiment_name or pipeline
        self._config: dict[str, Any] = {}
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        if settings.autolog:
            _autolog()
        # No call to the tracking server here: drivers are built while the daemon starts
        # and reloads, and MLflow's client retries a server it cannot reach for about four
        # minutes. Each run reaches the store in its before-graph hook instead (a wrong
        # tracking_uri fails the runs of this pipeline, with MLflow's message).

    def _new_tracker(self, run_name: str | None, tags: Mapping[str, object]) -> Any:
        s = self._settings
        return h_mlflow.MLFlowTracker(
            tracking_uri=s.tracking_uri,
            registry_uri=s.registry_uri,
            artifact_location=s.artifact_location,
            experiment_name=self._experiment,
            experiment_tags=dict(s.experiment_tags),
            experiment_description=s.experiment_description,
            run_id=s.run_id,
            run_name=run_name,
            run_tags=dict(tags),
            run_description=s.run_description,
        )

    def run_after_graph_construction(self, *, config: dict[str, Any], **kwargs: Any) -> None:
        self._config = config

    def run_before_graph_execution(self, *, run_id: str, **kwargs: Any) -> None:
        request = current()
        s = self._settings
        name = fill_run_name(s.run_name, self._pipeline, request) if s.run_name else None
        tracker = self._new_tracker(name, {**s.tags, **run_tags(request)})
        tracker.run_after_graph_construction(config=self._config)
        # Hamilton's tracker also starts the run in MLflow's fluent API (so that nodes,
        # materializers and autologging log to it), which reads the process's tracking URI.
        if s.tracking_uri is not None:
            mlflow.set_tracking_uri(s.tracking_uri)
        if s.registry_uri is not None:
            mlflow.set_registry_uri(s.registry_uri)
        run = _Run(tracker, fluent=mlflow.active_run() is None)
        if run.fluent:
            tracker.run_before_graph_execution(run_id=run_id, **kwargs)
        else:
            _start_without_fluent_run(tracker, run_id, **kwargs)
        with self._lock:
            self._runs[run_id] = run

    def run_before_node_execution(self, **kwargs: Any) -> None:
        """Nothing to log before a node runs."""

    def run_after_node_execution(
        self,
        *,
        run_id: str,
        node_name: str,
        node_return_type: type,
        node_tags: dict[str, Any],
        result: Any,
        success: bool = True,
        **kwargs: Any,
    ) -> None:
        run = self._runs.get(run_id)
        if run is None or not success:
            return
        if isinstance(result, asyncio.Future):
            # Hamilton's async driver calls sync hooks with the node's task, before it is
            # awaited: the value is logged from the run's results at the end.
            if node_name in run.tracker.final_vars:
                run.deferred.append((node_name, node_return_type, node_tags, kwargs))
            return
        self._log_output(
            run.tracker, run_id, node_name, node_return_type, node_tags, result, kwargs
        )

    def _log_output(
        self,
        tracker: Any,
        run_id: str,
        node_name: str,
        node_return_type: type,
        node_tags: dict[str, Any],
        result: Any,
        kwargs: dict[str, Any],
    ) -> None:
        if node_tags.get("hamilton.data_saver") is True or node_return_type in (int, float):
            tracker.run_after_node_execution(
                run_id=run_id,
                node_name=node_name,
                node_return_type=node_return_type,
                node_tags=node_tags,
                result=result,
                **kwargs,
            )
        elif node_name in tracker.final_vars:
            if isinstance(result, str):
                tracker.client.log_text(tracker.run_id, result, f"{node_name}.txt")
            else:
                tracker.client.log_dict(tracker.run_id, _jsonable(result), f"{node_name}.json")

    def run_after_graph_execution(
        self,
        *,
        run_id: str,
        success: bool,
        results: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return
        tracker = run.tracker
        for node_name, return_type, node_tags, node_kwargs in run.deferred:
            if results is not None and node_name in results:
                value = results[node_name]
                self._log_output(
                    tracker, run_id, node_name, return_type, node_tags, value, node_kwargs
                )
        if run.fluent:
            tracker.run_after_graph_execution(success=success)
        else:
            tracker.client.set_terminated(
                tracker.run_id, status="FINISHED" if success else "FAILED"
            )


def _start_without_fluent_run(
    tracker: Any,
    run_id: str,
    *,
    final_vars: list[str],
    inputs: dict[str, Any],
    graph: Any,
    **kwargs: Any,
) -> None:
    """What ``MLFlowTracker.run_before_graph_execution`` does, but the fluent ``start_run``.

    MLflow keeps one active fluent run per thread: a second run of an async
    pipeline, on the same event loop thread while the first is still going,
    cannot start one. Its MLflow run is made and logged through the client
    alone (``mlflow.log_*`` calls inside its nodes go to the first run).
    """
    tags = {**tracker.run_tags, "hamilton_run_id": run_id, "code_version": graph.version}
    tracker.run = tracker.client.create_run(
        experiment_id=tracker.experiment_id, tags=tags, run_name=tracker.run_name
    )
    tracker.run_id = tracker.run.info.run_id
    tracker.graph = graph
    tracker.final_vars = final_vars
    tracker.client.log_dict(tracker.run_id, tracker.config, "config.json")
    graph_json = {n.name: n.as_dict() for n in graph.nodes}
    tracker.client.log_dict(tracker.run_id, graph_json, "hamilton_graph.json")
    for values in (tracker.config, inputs):
        for key, value in values.items():
            tracker.client.log_param(tracker.run_id, key=key, value=value)


def _jsonable(value: object) -> object:
    """``value`` as JSON can hold it: containers kept, anything else by its ``repr``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return repr(value)
