"""FlowerPower's lifecycle hooks: ``hooks/<pipeline>/hook.py``.

The ``mqtt-build-config`` hook is a function ``mqtt_build_config(payload,
topic) -> dict`` whose dict is merged into the Hamilton config of the run
for that one message. (FlowerPower merged it into a shared dict, so one
message's config leaked into the next; here it travels in the run request.)
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PipelineImportError
from .modules import import_pipeline_module, module_name_for
from .registry import HOOKS_DIR, ProjectFiles

__all__ = ["MQTT_BUILD_CONFIG", "load_mqtt_build_config"]

MQTT_BUILD_CONFIG = "mqtt_build_config"

#: ``mqtt_build_config(payload, topic)``: the Hamilton config for a message (user code).
ConfigHook = Callable[[object, str], dict[str, object]]


def load_mqtt_build_config(files: ProjectFiles, pipeline: str) -> ConfigHook | None:
    """The pipeline's ``mqtt_build_config`` hook, or ``None`` when it has none (blocking I/O)."""
    rel = f"{HOOKS_DIR}/{pipeline}/hook.py"
    if not files.exists(rel):
        return None
    module = import_pipeline_module(files, rel, module_name_for(files, f"hook_{pipeline}"))
    fn = getattr(module, MQTT_BUILD_CONFIG, None)
    if fn is None:
        return None
    if not callable(fn):
        raise PipelineImportError(f"{files.display(rel)}: {MQTT_BUILD_CONFIG} is not a function")
    return fn  # type: ignore[no-any-return]
