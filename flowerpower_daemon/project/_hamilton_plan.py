"""Sync runs of a plain Hamilton driver replayed from a plan: :class:`FastExecutor`.

Part of the package's Hamilton boundary with :mod:`._hamilton` (which hands
it out as ``_hamilton.fast_executor``); imports Hamilton.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HAMILTON_TELEMETRY_ENABLED", "false")

from hamilton import driver, htypes
from hamilton import node as h_node
from hamilton.execution.graph_functions import node_is_required_by_anything

__all__ = ["FastExecutor", "fast_executor"]


class _NoPlan(Exception):
    """This input set runs through Hamilton's own ``execute`` (it will raise there)."""


#: One step of a plan: node name, its function (``None`` for an input), the names of the
#: arguments it is called with, the values no later step needs (dropped after it).
_Step = tuple[str, Callable[..., object] | None, tuple[str, ...], tuple[str, ...]]
#: A runtime input Hamilton type-checks: name, annotation, whether a plain class.
_InputCheck = tuple[str, Any, bool]


@dataclass(frozen=True, slots=True)
class _Plan:
    steps: tuple[_Step, ...]
    checks: tuple[_InputCheck, ...]


class FastExecutor:
    """``Driver.execute`` for a plain sync driver, without redoing its per-run graph work.

    Hamilton's ``execute`` walks the graph on every call: the upstream nodes
    of the final vars (a DFS), the input checks, then a recursive DFS that
    runs the nodes (a ``node.name`` string join per visit, a debug log line
    per node, a ``uuid4`` per run): ~300 Python calls for a four-node DAG,
    more than the nodes themselves. What all that decides depends only on
    the final vars and on which inputs are given, so it is worked out once
    per such set (a :class:`_Plan`: the nodes in Hamilton's order, each
    with the arguments it gets) and replayed.

    Only for a driver whose ``execute`` does nothing else: Hamilton's default
    executor and no lifecycle adapters at all (no cache, tracker, result
    builder, thread pool; :func:`fast_executor` decides). A run whose inputs
    Hamilton would refuse (a missing required input, a value of the wrong
    type, a clash with the config) goes to ``Driver.execute``, which raises
    its own error: :meth:`__call__` returns ``None`` then.
    """

    __slots__ = ("_config", "_graph", "_plans")

    _MAX_PLANS = 64  # input sets kept (a payload decides which inputs are given)

    def __init__(self, dr: Any) -> None:
        self._graph = dr.graph
        self._config: dict[str, object] = dict(dr.graph.config)
        self._plans: dict[tuple[tuple[str, ...], frozenset[str]], _Plan | None] = {}

    def __call__(
        self, final_vars: tuple[str, ...], inputs: dict[str, object]
    ) -> dict[str, object] | None:
        """The outputs ``Driver.execute(final_vars, inputs=inputs)`` returns, or ``None``
        when this run must go through it (see the class doc)."""
        key = (final_vars, frozenset(inputs))
        try:
            plan = self._plans[key]
        except KeyError:
            if len(self._plans) >= self._MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._compile(final_vars, inputs)
        if plan is None:
            return None
        check_input_type = htypes.check_input_type
        for name, tp, plain in plan.checks:
            value = inputs[name]
            if value is None or (plain and isinstance(value, tp)):
                continue
            if not check_input_type(tp, value):
                return None
        config = self._config
        values = {**config, **inputs} if config else inputs
        computed: dict[str, object] = {}
        for name, fn, args, drop in plan.steps:
            if fn is None:
                computed[name] = values[name]
            else:
                computed[name] = fn(**{a: computed[a] for a in args})
            for gone in drop:
                del computed[gone]
        return {v: computed.get(v, inputs.get(v)) for v in final_vars}

    def _compile(self, final_vars: tuple[str, ...], inputs: dict[str, object]) -> _Plan | None:
        """What Hamilton's ``execute`` would do for these final vars and input names."""
        graph, config = self._graph, self._config
        if any(k in config for k in inputs):
            return None  # Hamilton refuses the clash
        try:
            nodes, user_nodes = graph.get_upstream_nodes(list(final_vars), inputs)
        except Exception:
            return None  # an unknown final var: Hamilton says which
        expand_collect = (h_node.NodeType.EXPAND, h_node.NodeType.COLLECT)
        if any(n.node_role in expand_collect for n in nodes | user_nodes):
            return None  # Hamilton's default executor refuses them
        given = {**config, **inputs}
        checks: list[_InputCheck] = []
        for un in user_nodes:
            name = un.name
            if name not in given:
                if node_is_required_by_anything(un, nodes):
                    return None  # a missing input
                continue
            tp = un.type
            if tp == Any:
                continue  # Hamilton takes anything for it
            if name in config:
                value = config[name]
                if value is not None and not htypes.check_input_type(tp, value):
                    return None
                continue
            plain = inspect.isclass(tp) and not htypes.typing_inspect.is_generic_type(tp)
            checks.append((name, tp, plain))
        order: list[tuple[str, Callable[..., object] | None, tuple[str, ...]]] = []
        done: set[str] = set()

        # Hamilton's execute_subdag, visiting instead of computing (same order, same skips).
        def visit(n: h_node.Node, dep_type: h_node.DependencyType) -> None:
            if n.name in done:
                return
            for dep in n.dependencies:
                if dep.name not in done:
                    visit(dep, n.input_types[dep.name][1])
            if n.user_defined:
                if n.name not in given:
                    if dep_type != h_node.DependencyType.OPTIONAL:
                        raise _NoPlan
                    return
                order.append((n.name, None, ()))
            else:
                args = tuple(d.name for d in n.dependencies if d.name in done)
                order.append((n.name, n.callable, args))
            done.add(n.name)

        try:
            for var in final_vars:
                n = graph.nodes.get(var)
                if n is not None:
                    visit(
                        n,
                        h_node.DependencyType.OPTIONAL
                        if n.user_defined
                        else h_node.DependencyType.REQUIRED,
                    )
        except _NoPlan:
            return None
        # Each value is dropped after its last use, unless it is an output.
        last_use: dict[str, int] = {}
        for i, (_, _, args) in enumerate(order):
            for a in args:
                last_use[a] = i
        keep = set(final_vars)
        steps = tuple(
            (
                name,
                fn,
                args,
                tuple(a for a in dict.fromkeys(args) if last_use[a] == i and a not in keep),
            )
            for i, (name, fn, args) in enumerate(order)
        )
        return _Plan(steps, tuple(checks))


def fast_executor(dr: Any) -> FastExecutor | None:
    """A :class:`FastExecutor` for ``dr`` if its ``execute`` is plain, else ``None``."""
    if (
        type(dr) is not driver.Driver
        or type(dr.graph_executor) is not driver.DefaultGraphExecutor
        or dr.adapter.adapters
    ):
        return None
    return FastExecutor(dr)
