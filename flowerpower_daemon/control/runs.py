"""``flowerpowerctl runs show RUN_ID [--dag FILE]``: one run, and the DAG path it executed.

The run comes from the daemon's ``job`` command (active runs and the
history); its picture from the ``dag`` command, asked for what the run
computed: the outputs its result holds (else the outputs its request
named, else the pipeline's ``run.final_vars``), with the node a failed run
stopped in marked. The daemon answers with DOT text, built in a worker
thread from the project it runs; the picture is drawn here, with this
machine's ``dot``. So it works against a remote or systemd daemon whose
project files this machine cannot see, and the daemon never runs Graphviz.

The history does not keep a run's Hamilton config or inputs: a finished
run is drawn with the pipeline's current config.
"""

from __future__ import annotations

from collections.abc import Mapping

from .top import Connection

__all__ = ["dag_request", "show_run"]


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def dag_request(record: Mapping[str, object]) -> dict[str, object]:
    """The ``dag`` arguments that draw what the run of ``record`` (a ``job`` answer) executed."""
    out: dict[str, object] = {"pipeline": str(record.get("pipeline")), "run_path": True}
    overrides = _mapping(_mapping(record.get("request")).get("overrides"))  # active runs
    names, config = overrides.get("final_vars"), overrides.get("config")
    if isinstance(names, list) and names:
        out["final_vars"] = list(names)
    if isinstance(config, Mapping) and config:
        out["config"] = dict(config)
    result = _mapping(record.get("result"))
    outputs = result.get("outputs")
    if isinstance(outputs, Mapping) and outputs:
        out["final_vars"] = list(outputs)
    node = _mapping(result.get("error")).get("node")
    if isinstance(node, str):
        out["failed_node"] = node
    return out


async def show_run(
    client: Connection, run_id: str, *, dag: bool
) -> tuple[object, Mapping[str, object] | None]:
    """The ``job`` answer for ``run_id`` and, when ``dag``, the ``dag`` answer for it."""
    record = await client.call("job", {"id": run_id})
    if not dag or not isinstance(record, Mapping):
        return record, None
    picture = await client.call("dag", dag_request(record))
    return record, _mapping(picture)
