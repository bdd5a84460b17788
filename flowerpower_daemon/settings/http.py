"""``http:``: the optional HTTP listener (``/metrics``, ``/healthz``, ``/readyz``, ``/``)."""

from __future__ import annotations

from pydantic import field_validator

from .base import _Frozen

__all__ = ["HttpSettings", "parse_listen"]


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError says what is wrong.

    A missing host (``:9464``) means every IPv4 interface (``0.0.0.0``; ``[::]:9464`` for
    IPv6): say so explicitly, the default is loopback only.
    """
    raw = text.strip()
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: use host:port or [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: use host:port (e.g. 127.0.0.1:9464) or [ipv6]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 0..65535")
    return host or "0.0.0.0", port


class HttpSettings(_Frozen):
    """Off unless ``listen`` is set (needs the ``metrics`` extra: prometheus-client)."""

    listen: str | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _not_a_string(cls, value: object) -> object:
        """``listen: 9464`` in YAML is a number: say what to write, not "not a string"."""
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"{value}: a port alone; write host:port, e.g. 127.0.0.1:{value}")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{value!r}: write host:port as text, e.g. 127.0.0.1:9464")
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_listen(value)
            return value.strip()
        return None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the listener is off."""
        return parse_listen(self.listen) if self.listen else None
