"""The package's layers: imports only go down, and no module imports itself back.

Every module of ``flowerpower_daemon`` is parsed with ``ast`` (not imported):
every import counts, at module level, inside functions (lazy imports) and
under ``TYPE_CHECKING``, relative or absolute. The layers, low to high::

    root helpers (errors, argtypes, retry, logs, redact, version, topics)
    < project, tracing < settings < sources, state < mqtt < dispatch < queue
    < control < observe < service < cli, __init__

A module may import its own layer or lower ones; a cycle among modules fails
whatever the layers say (a lazy import only hides one from the interpreter).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import flowerpower_daemon

PACKAGE = "flowerpower_daemon"
ROOT = Path(flowerpower_daemon.__file__).parent

#: Top-level module or sub-package -> its layer (higher imports lower, never the reverse).
LAYERS: dict[str, int] = {
    "errors": 0,
    "argtypes": 0,
    "retry": 0,
    "logs": 0,
    "redact": 0,
    "version": 0,
    "topics": 0,
    "project": 1,
    "tracing": 1,
    "settings": 2,
    "sources": 3,
    "state": 3,
    "mqtt": 4,
    "dispatch": 5,
    "queue": 6,
    "control": 7,
    "observe": 8,
    "service": 9,
    "cli": 10,
    "__init__": 10,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported package module, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _longest_known(alias.name, known)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                # ``from . import reload`` imports a module; ``from .x import name`` imports x.
                sub = f"{source}.{alias.name}"
                target = sub if sub in known else _longest_known(source, known)
                if target is not None:
                    yield target, node.lineno


def _longest_known(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: add {top!r} to LAYERS (which layer is it?)"
    return top, LAYERS[top]


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    modules = all_modules()
    known = set(modules)
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        out: dict[str, int] = {}
        for target, line in imports_of(name, path, known):
            if target != name:
                out.setdefault(target, line)
        edges[name] = out
    return edges


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (as a closed path), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    """No module reaches itself through imports (lazy and TYPE_CHECKING ones count)."""
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_only_go_down_the_layers() -> None:
    """Each import stays in its layer or goes lower (see the module docstring)."""
    upward = []
    for module, targets in graph().items():
        top, level = layer_of(module)
        for target, line in targets.items():
            other, other_level = layer_of(target)
            if other_level > level:
                upward.append(
                    f"{module}:{line} imports {target} ({top} {level} < {other} {other_level})"
                )
    assert not upward, "imports going up a layer:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The parser finds imports inside functions and under TYPE_CHECKING, relative and absolute."""
    source = tmp_path / "flowerpower_daemon" / "mqtt" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..service.daemon import Daemon\n"
        "def f():\n"
        "    from flowerpower_daemon.control import commands\n"
        "    import flowerpower_daemon.queue.broker\n"
        "    from . import link\n",
        encoding="utf-8",
    )
    known = {
        "flowerpower_daemon.service.daemon",
        "flowerpower_daemon.control.commands",
        "flowerpower_daemon.control",
        "flowerpower_daemon.queue.broker",
        "flowerpower_daemon.mqtt.link",
    }
    found = {t for t, _ in imports_of("flowerpower_daemon.mqtt.probe", source, known)}
    assert found == known - {"flowerpower_daemon.control"}
    cyclic = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}
    assert find_cycle(cyclic) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
