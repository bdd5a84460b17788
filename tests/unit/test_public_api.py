"""The package's public names: every `__all__` entry exists, and importing starts nothing heavy."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import flowerpower_daemon


def test_every_name_in_all_resolves() -> None:
    """Each name listed in a module's __all__ can be fetched from that module."""
    modules = ["flowerpower_daemon"] + [
        m.name for m in pkgutil.walk_packages(flowerpower_daemon.__path__, "flowerpower_daemon.")
        if m.name not in ("flowerpower_daemon.mqtt.embedded",)  # needs the optional amqtt extra
    ]
    missing = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            if not hasattr(module, attr):
                missing.append(f"{name}.{attr}")
    assert missing == []


def test_importing_the_package_loads_no_hamilton_or_taskiq() -> None:
    """`import flowerpower_daemon` has no heavy import-time side effects."""
    code = (
        "import sys, flowerpower_daemon; "
        "print(','.join(m for m in ('hamilton', 'taskiq', 'pandas', 'aiomqtt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
