"""Stage ``dedup``: a message whose ``dedup_key`` was seen within ``dedup_ttl`` is not run again.

The key (a template over the payload, topic fields and MQTT v5 user
properties) is claimed in the dedup store under ``<trigger>:<key>``. A new
key goes on, and the admission carries it so that the run completes it (or a
later rejection releases it). A key already claimed is a duplicate: the
earlier run's result, if it finished, is published again to this message's
reply target. A template naming a value the message lacks is bad input.
"""

from __future__ import annotations

import orjson

from ..mqtt.sinks import MqttResultSink, ResultSink
from ..settings import MqttSettings
from ..state.dedup import DedupStore, render_key
from .chain import Admission, Rejection, Trigger, reply_for

__all__ = ["Dedup"]


class Dedup:
    """Claim the event's dedup key; reject a duplicate (re-publishing the earlier result)."""

    __slots__ = ("cfg", "mqtt", "sink", "store", "template")

    def __init__(
        self, cfg: Trigger, template: str, store: DedupStore, sink: ResultSink, mqtt: MqttSettings
    ) -> None:
        self.cfg = cfg
        self.template = template
        self.store = store
        self.sink = sink
        self.mqtt = mqtt

    async def __call__(self, admission: Admission) -> Rejection | None:
        try:
            key = render_key(self.template, admission.key_values())
        except KeyError as exc:
            return Rejection("bad_input", str(exc.args[0]))
        key = f"{self.cfg.name}:{key}"
        claim, earlier = await self.store.claim(key, admission.run_id, self.cfg.dedup_ttl)
        if claim == "new":
            admission.dedup_key = key
            return None
        if earlier is not None and isinstance(self.sink, MqttResultSink):
            ok = orjson.loads(earlier).get("status") == "success"
            reply = reply_for(
                self.cfg, admission.event, admission.run_id, self.mqtt, admission.reply_to
            )
            await self.sink.publish_encoded(reply, earlier, ok=ok)
        detail = {"dedup_key": key, "state": claim}
        return Rejection("duplicate", log="duplicate_not_run", detail=detail)
