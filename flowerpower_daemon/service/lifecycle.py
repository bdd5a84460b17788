"""Process lifecycle helpers the daemon and the worker share."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import anyio

from ..errors import ConfigError
from ..logs import configure_logging, print_error
from ..redact import redact_url
from ..settings import Settings, load_settings

__all__ = ["freeze_heap", "process_settings", "shielded"]


def process_settings(config: str | None, log_level: str | None) -> Settings | None:
    """The settings of a daemon or worker process, its logging configured; ``None`` once a
    bad config was reported as one ``error:`` line (the caller exits 2)."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print_error(redact_url(str(exc)))
        return None
    configure_logging(log_level or settings.log_level, settings.log_format)
    return settings


def freeze_heap() -> None:
    """Put what start-up built (modules, project, drivers) out of the collector's way.

    A full collection walks every object, about 75 ms on this heap (Hamilton,
    pandas, numpy), and runs every few thousand messages: a pause in the
    middle of traffic and ~4 % of the CPU. Frozen, the objects are skipped
    (``gc.freeze``). Called again after a reload: unfrozen and collected first,
    so that the old project's reference cycles are freed, not kept for good.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def shielded(fn: Callable[[], Awaitable[object]]) -> None:
    """``await fn()`` at shutdown: shielded from cancellation, for at most 5 s."""
    with anyio.move_on_after(5, shield=True):
        await fn()
