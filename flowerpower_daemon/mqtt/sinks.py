"""Where results go: the reply target of a run and the sinks that deliver it.

The reply target is decided at dispatch and carried in ``RunRequest.reply``
(so a worker on another machine publishes to the same place): the MQTT v5
response topic with its correlation data when the request carried them,
else the ``reply_to`` of a JSON payload, else the trigger's or the global
``result_topic`` template. Failures also go to ``error_topic``. A topic no
message can be published to is skipped with a warning, so the error topic
still gets the failure; an unusable v5 response topic is ignored at dispatch
(the result goes to the trigger's result topic instead).

A result larger than ``mqtt.max_result_bytes`` is cut down to fit (outputs
replaced by ``truncated`` markers, see ``project/encoding.py``), unless
``mqtt.result_store`` names an fsspec URL template: then the whole result is
written there (in a worker thread) and the message carries a reference,
``"outputs": null, "stored": {"url": ..., "bytes": N}``, with the run's
small fields (ids, status, trigger, error, times).
"""

from __future__ import annotations

import base64
import functools
import string
from collections.abc import Mapping, Sequence
from typing import Protocol, TypedDict

import anyio.to_thread
import structlog

from .. import tracing
from ..project.encoding import dumps, encode_result
from ..project.models import RunRequest, RunResult
from ..sources.mqtt import topic_name_problem
from .link import MqttLink, OutgoingMessage

__all__ = [
    "FanOutSink",
    "MqttResultSink",
    "Reply",
    "ResultSink",
    "ResultStore",
    "render_topic",
    "reply_target",
]

log = structlog.get_logger("flowerpower_daemon.results")


class ResultSink(Protocol):
    async def emit(self, request: RunRequest, result: RunResult) -> None: ...


class Reply(TypedDict, total=False):
    """``RunRequest.reply``: where a run's result goes (JSON-safe, so workers see it too)."""

    publish: bool
    topic: str
    correlation: str  # MQTT v5 correlation data, base64
    error_topic: str


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


def render_topic(template: str, fields: Mapping[str, object]) -> str:
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
) -> Reply:
    """The ``RunRequest.reply`` mapping for one run (JSON-safe)."""
    values = {**fields, "pipeline": pipeline, "trigger": trigger, "run_id": run_id}
    reply: Reply = {"publish": publish}
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


class ResultStore:
    """Keeps results too large for one MQTT message whole, at an fsspec URL.

    ``template`` names the file, with ``{pipeline}``, ``{trigger}`` and
    ``{run_id}`` (their ``/``, ``+``, ``#`` become ``_``), e.g.
    ``s3://bucket/results/{pipeline}/{run_id}.json``. Writing is blocking I/O:
    it runs in a worker thread, never on the event loop.
    """

    def __init__(self, template: str) -> None:
        self.template = template

    def url_for(self, result: RunResult) -> str:
        fields = {"pipeline": result.pipeline, "trigger": result.trigger.name}
        return render_topic(self.template, {**fields, "run_id": result.run_id})

    async def put(self, result: RunResult, data: bytes) -> str:
        """Write ``data`` (the result's whole JSON) to its URL; return the URL."""
        url = self.url_for(result)
        await anyio.to_thread.run_sync(_write, url, data)
        return url


def _write(url: str, data: bytes) -> None:
    import fsspec  # deferred: only daemons that store results pay for it

    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rpartition("/")[0]
    if parent:  # a local file needs its directory
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def reference_message(result: RunResult, url: str, size: int, max_bytes: int) -> bytes:
    """The message of a stored result: its small fields, ``"outputs": null`` and where it is.

    An error message that alone would break ``max_bytes`` is cut (the stored
    result has it whole) and the message says ``"truncated": true``.
    """
    message = result.to_dict(raw_times=True)
    message["outputs"] = None
    message["stored"] = {"url": url, "bytes": size}
    data = dumps(message)
    error = message["error"]
    if len(data) > max_bytes and isinstance(error, dict) and isinstance(error.get("message"), str):
        text: str = error["message"]
        message["truncated"] = True
        while len(data) > max_bytes and text:  # each turn cuts at least len(_CUT) characters
            text = text[: max(0, len(text) - (len(data) - max_bytes) - len(_CUT))]
            error["message"] = text + _CUT
            data = dumps(message)
    return data


_CUT = " ... [truncated]"


class MqttResultSink:
    """Publishes each result as JSON (QoS 1 by default) to its reply target."""

    def __init__(
        self,
        link: MqttLink,
        *,
        qos: int = 1,
        max_bytes: int | None = None,
        result_store: str | None = None,
    ) -> None:
        self.link = link
        self.qos = qos
        self.max_bytes = max_bytes
        self.store = ResultStore(result_store) if result_store else None
        self.results_out = 0
        self.results_stored = 0
        self.unpublishable = 0

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        if request.reply.get("publish", True):
            payload = await self.encode(result)
            props = tracing.reply_properties()  # the run's traceparent; () unless tracing
            await self.publish_encoded(request.reply, payload, ok=result.ok, user_properties=props)

    async def encode(self, result: RunResult) -> bytes:
        """The message for ``result``: whole, or a reference to where it is stored, or cut.

        A stored result's reference also becomes ``result.encoded``, the
        message that the job history and later readers of this result keep.
        A store that fails (logged) leaves the cut-down message of old.
        """
        max_bytes, store = self.max_bytes, self.store
        if store is None or max_bytes is None:
            return encode_result(result, max_bytes=max_bytes)
        full = encode_result(result)
        if len(full) <= max_bytes:
            return full
        try:
            url = await store.put(result, full)
        except Exception as exc:
            log.warning("result_store_failed", run_id=result.run_id, error=repr(exc)[:500])
            return encode_result(result, max_bytes=max_bytes)
        self.results_stored += 1
        reference = result.encoded = reference_message(result, url, len(full), max_bytes)
        return reference

    async def publish_encoded(
        self,
        reply: Mapping[str, object],
        payload: bytes,
        *,
        ok: bool,
        user_properties: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Send an encoded result to ``reply``'s topic, and to its error topic on failure.

        Also used to re-publish an earlier result to a duplicate's reply target.
        """
        if not reply.get("publish", True):
            return
        correlation = reply.get("correlation")
        corr = base64.b64decode(correlation) if isinstance(correlation, str) else None
        topic, error_topic = reply.get("topic"), reply.get("error_topic")
        topics: list[tuple[str, bytes | None]] = []
        if isinstance(topic, str) and topic:
            topics.append((topic, corr))
        if not ok and isinstance(error_topic, str) and error_topic and error_topic != topic:
            topics.append((error_topic, None))
        for topic_name, correlation_data in topics:
            problem = topic_name_problem(topic_name)
            if problem is not None:
                # E.g. an MQTT v5 response topic with a wildcard (the broker passes those
                # on): publishing would raise, or get the link dropped by the broker.
                self.unpublishable += 1
                log.warning("result_topic_unpublishable", topic=topic_name[:200], problem=problem)
                continue
            await self.link.publish(
                OutgoingMessage(
                    topic_name,
                    payload,
                    qos=self.qos,
                    correlation_data=correlation_data,
                    user_properties=user_properties,
                )
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
