"""aiomqtt and paho are imported by one module of the package, so an upgrade touches one file."""

from __future__ import annotations

import ast
from pathlib import Path

import flowerpower_daemon

PACKAGE = Path(flowerpower_daemon.__file__).parent
THIRD_PARTY = ("aiomqtt", "paho")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, lazy imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_mqtt_client_imports_aiomqtt_and_paho() -> None:
    """Every import of aiomqtt or paho in the package is in mqtt/client.py."""
    users = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if _imports(path) & set(THIRD_PARTY)
    }
    assert users == {"mqtt/client.py"}
