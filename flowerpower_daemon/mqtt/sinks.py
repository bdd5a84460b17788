"""Where results go: the reply target of a run and the sinks that deliver it.

The reply target is decided at dispatch and carried in ``RunRequest.reply``
(so a worker on another machine publishes to the same place): the MQTT v5
response topic with its correlation data when the request carried them,
else the ``reply_to`` of a JSON payload, else the trigger's or the global
``result_topic`` template. Failures also go to ``error_topic``. A topic no
message can be published to is skipped with a warning, so the error topic
still gets the failure; an unusable v5 response topic is ignored at dispatch
(the result goes to the trigger's result topic instead).
"""

from __future__ import annotations

import base64
import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog

from ..project.encoding import encode_result
from ..project.models import RunRequest, RunResult
from ..sources.mqtt import topic_name_problem
from .link import MqttLink, OutgoingMessage

__all__ = ["MqttResultSink", "ResultSink", "render_topic", "reply_target"]

log = structlog.get_logger("flowerpower_daemon.results")


class ResultSink(Protocol):
    async def emit(self, request: RunRequest, result: RunResult) -> None: ...


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


_LEVEL_SAFE = str.maketrans("/+#", "___")


@functools.lru_cache(maxsize=512)
def _template_parts(template: str) -> tuple[tuple[str, str | None], ...] | None:
    """``template`` as (literal, field name) pairs; None when it needs ``str.format``
    itself (a format spec, a conversion, ``{a.b}`` or ``{a[0]}``, or bad syntax)."""
    parts: list[tuple[str, str | None]] = []
    try:
        for literal, name, spec, conversion in string.Formatter().parse(template):
            if name is not None and (spec or conversion or not name.isidentifier()):
                return None
            parts.append((literal, name))
    except ValueError:
        return None
    return tuple(parts)


def render_topic(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``{pipeline}``, ``{trigger}``, ``{run_id}`` and topic fields; unknown names stay."""
    # A field value must not add levels or wildcards to the topic it is put into.
    if "{" not in template:
        return template
    parts = _template_parts(template)
    if parts is None:
        safe = _Fields({k: str(v).translate(_LEVEL_SAFE) for k, v in fields.items()})
        return template.format_map(safe)
    # Twice per run: only the fields the template names are made safe (not all of them).
    out = []
    for literal, name in parts:
        out.append(literal)
        if name is not None:
            value = fields.get(name)
            if value is None and name not in fields:
                out.append("{" + name + "}")
            else:
                out.append(str(value).translate(_LEVEL_SAFE))
    return "".join(out)


def reply_target(
    *,
    pipeline: str,
    trigger: str,
    run_id: str,
    fields: Mapping[str, str],
    result_topic: str | None,
    error_topic: str | None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    reply_to: str | None = None,
    publish: bool = True,
) -> dict[str, Any]:
    """The ``RunRequest.reply`` mapping for one run (JSON-safe)."""
    values = {**fields, "pipeline": pipeline, "trigger": trigger, "run_id": run_id}
    reply: dict[str, Any] = {"publish": publish}
    # A response topic no message can be published to (a wildcard, say) is ignored:
    # the result goes where it would have gone without one.
    if response_topic and topic_name_problem(response_topic) is None:
        reply["topic"] = response_topic
        if correlation_data is not None:
            reply["correlation"] = base64.b64encode(correlation_data).decode()
    elif reply_to:
        reply["topic"] = reply_to
    elif result_topic:
        reply["topic"] = render_topic(result_topic, values)
    if error_topic:
        reply["error_topic"] = render_topic(error_topic, values)
    return reply


class MqttResultSink:
    """Publishes each result as JSON (QoS 1 by default) to its reply target."""

    def __init__(self, link: MqttLink, *, qos: int = 1, max_bytes: int | None = None) -> None:
        self.link = link
        self.qos = qos
        self.max_bytes = max_bytes
        self.results_out = 0
        self.unpublishable = 0

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        if request.reply.get("publish", True):
            payload = encode_result(result, max_bytes=self.max_bytes)
            await self.publish_encoded(request.reply, payload, ok=result.ok)

    async def publish_encoded(self, reply: Mapping[str, Any], payload: bytes, *, ok: bool) -> None:
        """Send an encoded result to ``reply``'s topic, and to its error topic on failure.

        Also used to re-publish an earlier result to a duplicate's reply target.
        """
        if not reply.get("publish", True):
            return
        correlation = reply.get("correlation")
        corr = base64.b64decode(correlation) if isinstance(correlation, str) else None
        topics: list[tuple[str, bytes | None]] = []
        if reply.get("topic"):
            topics.append((reply["topic"], corr))
        if not ok and reply.get("error_topic") and reply.get("error_topic") != reply.get("topic"):
            topics.append((reply["error_topic"], None))
        for topic, correlation_data in topics:
            problem = topic_name_problem(topic)
            if problem is not None:
                # E.g. an MQTT v5 response topic with a wildcard (the broker passes those
                # on): publishing would raise, or get the link dropped by the broker.
                self.unpublishable += 1
                log.warning("result_topic_unpublishable", topic=topic[:200], problem=problem)
                continue
            await self.link.publish(
                OutgoingMessage(topic, payload, qos=self.qos, correlation_data=correlation_data)
            )
            self.results_out += 1


class FanOutSink:
    """Sends a result to several sinks; one failing sink never stops the others."""

    def __init__(self, sinks: Sequence[ResultSink]) -> None:
        self.sinks = list(sinks)

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        for sink in self.sinks:
            try:
                await sink.emit(request, result)
            except Exception:
                log.exception("sink_failed", sink=type(sink).__name__, run_id=result.run_id)
