"""``mqtt:``: the broker, its TLS, topics, limits and the result store."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from ..redact import redact_url
from .base import _Frozen


class TlsSettings(_Frozen):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class MqttSettings(_Frozen):
    """The MQTT connection, shared by triggers, results and the status topic."""

    url: str = "mqtt://127.0.0.1:1883"
    embedded_bind: str = "127.0.0.1:1883"
    client_id: str = "flowerpower-daemon"
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    clean_start: bool = False
    session_expiry: int = Field(default=86400, ge=0)
    keepalive: int = Field(default=60, ge=5)
    tls: TlsSettings | None = None
    # A template: ``{client_id}`` is this daemon's client id, so each daemon of a fleet
    # has its own retained status (a literal topic, without placeholders, works too).
    status_topic: str = "flowerpower/status/{client_id}"
    result_topic: str = "flowerpower/results/{pipeline}"
    error_topic: str = "flowerpower/errors/{pipeline}"
    result_qos: Literal[0, 1, 2] = 1
    max_payload_bytes: int = Field(default=256 * 1024, ge=1)
    # orjson itself refuses more than 1024 levels; deeper payloads are refused either way.
    max_payload_depth: int = Field(default=32, ge=1, le=1024)
    max_result_bytes: int = Field(default=256 * 1024, ge=1024)
    # An fsspec URL template ({pipeline}, {trigger}, {run_id}): a larger result is stored
    # whole there and its message carries a reference instead of truncated outputs.
    result_store: str | None = None
    reconnect_min: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    outbox_size: int = Field(default=10_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == "embedded":
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(
                f"invalid MQTT url {redact_url(value)!r}: "
                "use mqtt://host:port, mqtts://host:port or 'embedded'"
            )
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when asked)
        except ValueError as exc:
            raise ValueError(f"invalid MQTT url {redact_url(value)!r}: {exc}") from None
        return value

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        if not value:
            return value
        if "+" in value or "#" in value:
            raise ValueError(f"status_topic {value!r}: no wildcards (+, #) in a published topic")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"status_topic {value!r}: {exc}") from None
        unknown = sorted(names - {"client_id"})
        if unknown:
            raise ValueError(
                f"status_topic {value!r}: unknown field(s) {', '.join(unknown)}; use {{client_id}}"
            )
        if names and "{client_id}" not in value.split("/"):
            # The fleet view subscribes with + in its place: + must be a whole level.
            raise ValueError(
                f"status_topic {value!r}: {{client_id}} must be a whole topic level "
                "(e.g. flowerpower/status/{client_id})"
            )
        return value

    @field_validator("result_store")
    @classmethod
    def _result_store(cls, value: str | None) -> str | None:
        if value is None:
            return value
        protocol, sep, _ = value.partition("://")
        if not sep or not protocol:
            raise ValueError(
                f"result_store {value!r} is not a URL: use e.g. "
                "file:///var/lib/flowerpower/results/{run_id}.json or "
                "s3://bucket/results/{pipeline}/{run_id}.json"
            )
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"result_store {value!r}: {exc}") from None
        unknown = sorted(names - {"pipeline", "trigger", "run_id"})
        if unknown:
            raise ValueError(
                f"result_store {value!r}: unknown field(s) {', '.join(unknown)}; "
                "use {pipeline}, {trigger}, {run_id}"
            )
        if "run_id" not in names:
            raise ValueError(f"result_store {value!r} must contain {{run_id}} (one file per run)")
        import fsspec  # deferred: only a config that stores results pays for it

        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"result_store {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _status_level(self) -> MqttSettings:
        if "{client_id}" in self.status_topic and any(c in self.client_id for c in "/+#"):
            raise ValueError(
                f"client_id {self.client_id!r} cannot fill status_topic's {{client_id}} "
                "(one topic level: no /, + or #); change one of them"
            )
        return self

    @model_validator(mode="after")
    def _secret_file(self) -> MqttSettings:
        if self.password_file and self.password is None:
            try:
                secret = Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"password_file {self.password_file!r}: {exc.strerror}") from None
            object.__setattr__(self, "password", secret)
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)

    @property
    def use_tls(self) -> bool:
        return self.tls is not None or urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def own_status_topic(self) -> str:
        """This daemon's status topic: ``status_topic`` with its ``{client_id}``."""
        return self.status_topic.replace("{client_id}", self.client_id)

    @property
    def fleet_status_filter(self) -> str:
        """Every daemon's status topic: ``status_topic`` with ``+`` for ``{client_id}``."""
        return self.status_topic.replace("{client_id}", "+")
