"""Stage ``hook``: FlowerPower's ``mqtt_build_config(payload, topic)`` adds Hamilton config.

The hook's dict is merged into this one message's ``run.config`` override
(never into the trigger's, so it cannot leak into the next message). The hook
is user code: it runs in a worker thread, and whatever it raises, or a
return value that is not a dict, is bad input (``config_hook_failed``).
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio.to_thread

from ..project.hooks import ConfigHook
from .chain import Admission, Rejection

__all__ = ["ConfigHookStage"]


class ConfigHookStage:
    """Merge a pipeline's ``mqtt_build_config`` result into the admission's overrides."""

    __slots__ = ("hook",)

    def __init__(self, hook: ConfigHook) -> None:
        self.hook = hook

    async def __call__(self, admission: Admission) -> Rejection | None:
        event = admission.event
        payload = admission.inputs if event.payload is None else admission.payload_value()
        try:
            extra = await anyio.to_thread.run_sync(
                self.hook, payload, event.meta.get("topic") or ""
            )
            if not isinstance(extra, Mapping):
                raise TypeError(f"must return a dict, not {type(extra).__name__}")
        except Exception as exc:
            return Rejection(
                "bad_input",
                f"mqtt_build_config hook: {exc}",
                "config_hook_failed",
                {"error": str(exc)},
            )
        overrides = dict(admission.overrides)
        config = overrides.get("config")
        overrides["config"] = {**(config if isinstance(config, Mapping) else {}), **extra}
        admission.overrides = overrides
        return None
