"""One backoff policy for every retry and reconnect loop: base, multiplier, cap, jitter.

Pure functions: the delay for attempt *n* and whether an exception is
retryable. The loops that sleep live with their callers.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Backoff", "exception_matches"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n) = min(cap, base * multiplier**(n-1)) * (1 + U(-jitter, jitter))``."""

    base: float
    multiplier: float = 1.0
    jitter: float = 0.0
    cap: float | None = None

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``retry_number`` (1 = the first retry)."""
        raw = self.base * self.multiplier ** max(0, retry_number - 1)
        if self.cap is not None:
            raw = min(raw, self.cap)
        if self.jitter:
            raw *= 1.0 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, raw)


def exception_matches(exc: BaseException, names: Sequence[str]) -> bool:
    """True when ``exc`` is an instance of a class named in ``names``.

    A name matches a class along the exception's MRO by its plain name
    (``ValueError``, ``TransientDatabaseError``) or its dotted path
    (``requests.exceptions.ConnectionError``). A dotted name may also be a
    public alias such as ``json.JSONDecodeError`` (defined in
    ``json.decoder``), resolved only in modules already imported: nothing is
    imported. An empty list matches every ``Exception``.
    """
    if not names:
        return isinstance(exc, Exception)
    wanted = set(names)
    for cls in type(exc).__mro__:
        if cls.__name__ in wanted or f"{cls.__module__}.{cls.__qualname__}" in wanted:
            return True
    return any(_is_alias_of(name, exc) for name in wanted if "." in name)


def _is_alias_of(dotted: str, exc: BaseException) -> bool:
    module_name, _, attr = dotted.rpartition(".")
    module = sys.modules.get(module_name)
    target = getattr(module, attr, None) if module is not None else None
    return isinstance(target, type) and isinstance(exc, target)
