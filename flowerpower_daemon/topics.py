"""MQTT topic filters with named fields: ``sensors/{device}/temperature``.

The grammar, shared by the settings (which validate a trigger's ``topic``)
and the MQTT source (which matches messages): a ``{name}`` level subscribes
as ``+`` and turns the matched level into the input ``name``. Pure: no
connection, no other module of the package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["TopicPattern", "compile_topic"]

_FIELD_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled topic filter: the MQTT filter to subscribe to and the named levels."""

    source: str
    filter: str
    levels: tuple[str, ...]
    fields: Mapping[int, str]

    def match(self, topic: str) -> dict[str, str] | None:
        """The named fields if ``topic`` matches this filter, else ``None``."""
        parts = topic.split("/")
        out: dict[str, str] = {}
        for i, level in enumerate(self.levels):
            if level == "#":
                return out if not topic.startswith("$") or i > 0 else None
            if i >= len(parts):
                return None
            if level == "+":
                if i == 0 and parts[0].startswith("$"):
                    return None
                name = self.fields.get(i)
                if name is not None:
                    out[name] = parts[i]
            elif level != parts[i]:
                return None
        return out if len(parts) == len(self.levels) else None


def compile_topic(source: str) -> TopicPattern:
    """Validate a topic filter (``+``, ``#``, ``{name}`` levels) and compile it."""
    if not source or len(source.encode()) > 65535:
        raise ValueError("topic filter must be 1 to 65535 bytes")
    if "\x00" in source:
        raise ValueError(f"topic filter {source!r} contains a NUL character")
    raw = source.split("/")
    levels: list[str] = []
    fields: dict[int, str] = {}
    for i, level in enumerate(raw):
        m = _FIELD_RE.match(level)
        if m:
            name = m.group(1)
            if name in fields.values():
                raise ValueError(f"topic filter {source!r}: field {{{name}}} appears twice")
            fields[i] = name
            levels.append("+")
        elif level == "#":
            if i != len(raw) - 1:
                raise ValueError(f"topic filter {source!r}: '#' must be the last level")
            levels.append("#")
        elif level == "+":
            levels.append("+")
        elif any(c in level for c in "+#{}"):
            raise ValueError(
                f"topic filter {source!r}: level {level!r} mixes wildcards or braces with text; "
                "a wildcard or {field} must be a whole level"
            )
        else:
            levels.append(level)
    return TopicPattern(source, "/".join(levels), tuple(levels), fields)
