"""A pipeline's DAG as Graphviz DOT text, drawn by Hamilton's own graphviz support.

``pipeline visualize`` and the daemon's ``dag`` control command (behind
``flowerpowerctl runs show --dag``) both call :func:`dag_dot`. It returns
the DOT *source* only: turning that into SVG or PNG needs Graphviz's ``dot``
program, which the caller runs where the picture is wanted
(``control/draw.py``), so a daemon never needs ``dot`` and never blocks on it.

Hamilton builds the picture with the ``graphviz`` Python package (the
``viz`` extra); without it this is a one-line error naming the extra. Like
the rest of the Hamilton calls (``_hamilton.py``), the driver's methods are
only reached through a built driver, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import DependencyMissingError, InputError

if TYPE_CHECKING:
    from .runner import PipelineRunner

__all__ = ["DagPicture", "dag_dot", "require_graphviz"]

#: Fill colour of the node a failed run stopped in (``failed_node``).
FAILED_FILL = "#F4A6A6"
_FAILED = {"fillcolor": FAILED_FILL, "color": "red", "penwidth": "2"}


class _Digraph(Protocol):
    """What is read from the ``graphviz.Digraph`` Hamilton returns."""

    @property
    def source(self) -> str: ...

    def node(self, name: str, **attrs: str) -> None: ...


@dataclass(frozen=True, slots=True)
class DagPicture:
    """DOT text of one pipeline's DAG and what it shows."""

    pipeline: str
    #: The outputs whose path is drawn; empty when the whole module is drawn.
    final_vars: tuple[str, ...]
    dot: str

    def to_dict(self) -> dict[str, object]:
        return {"pipeline": self.pipeline, "final_vars": list(self.final_vars), "dot": self.dot}


def require_graphviz(what: str = "drawing a DAG") -> None:
    """Raise :class:`DependencyMissingError` (naming the ``viz`` extra) without ``graphviz``."""
    try:
        import graphviz  # noqa: F401
    except ImportError:
        raise DependencyMissingError(
            f"{what} needs the graphviz Python package; "
            "install it with: pip install 'flowerpower-daemon[viz]'"
        ) from None


def dag_dot(
    runner: PipelineRunner,
    pipeline: str,
    *,
    config: Mapping[str, object] | None = None,
    final_vars: Sequence[str] | None = None,
    inputs: Mapping[str, object] | None = None,
    failed_node: str | None = None,
    run_path: bool = False,
    orient: str = "LR",
) -> DagPicture:
    """The DOT text of ``pipeline``'s DAG (blocking: loads the module, builds the driver).

    Without ``final_vars``: every function of the module (Hamilton's
    ``display_all_functions``). With them: the execution path to those outputs
    (``visualize_execution``; outputs are filled boxes, inputs dotted), as a
    run asking for them would take it. ``config`` is Hamilton config over the
    pipeline's ``run.config`` (it picks ``@config.when`` functions);
    ``inputs`` mark what a run was given. ``failed_node`` is filled red.
    ``run_path`` without ``final_vars``: the path to the pipeline's own
    ``run.final_vars`` (what a run without overrides computes), not every node.
    """
    require_graphviz(f"drawing pipeline {pipeline!r}")
    overrides: dict[str, object] = {"config": dict(config)} if config else {}
    prepared = runner.prepare(pipeline, overrides)
    dr: Any = prepared.driver
    names = set(dr.graph.nodes)
    wanted = tuple(final_vars or (prepared.final_vars if run_path else ()))
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise InputError(
            f"pipeline {pipeline!r} has no node(s) {', '.join(map(repr, unknown))} "
            f"(nodes: {', '.join(sorted(names))})"
        )
    style = _failed_style(failed_node) if failed_node in names else None
    common: dict[str, Any] = {"orient": orient, "show_legend": True, "deduplicate_inputs": True}
    if style is not None:
        common["custom_style_function"] = style
    if wanted:
        given = {**prepared.base_inputs, **(inputs or {})}
        graph: _Digraph | None = dr.visualize_execution(
            list(wanted), inputs=given, bypass_validation=True, **common
        )
    else:
        graph = dr.display_all_functions(**common)
    if graph is None:  # Hamilton logs and returns None when graphviz cannot be imported
        require_graphviz(f"drawing pipeline {pipeline!r}")
        raise InputError(f"pipeline {pipeline!r}: Hamilton drew no graph")
    if style is not None and failed_node is not None:
        # Hamilton styles an output after the custom style: state the fill again, last.
        graph.node(failed_node, **_FAILED)
    return DagPicture(pipeline, wanted, graph.source)


def _failed_style(failed: str | None) -> Any:
    """A Hamilton ``custom_style_function`` that fills the failed node red (legend: failed)."""

    def style(*, node: Any, node_class: str) -> tuple[dict[str, str], str, str | None]:
        if node.name == failed:
            return dict(_FAILED), node_class, "failed"
        return {}, node_class, None

    return style
