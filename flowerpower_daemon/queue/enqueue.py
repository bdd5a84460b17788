"""The daemon's enqueue to the Redis stream: taskiq's message, the ``XADD``\\ s group-committed.

``kiq`` through taskiq's kicker costs a pydantic :class:`~taskiq.message.TaskiqMessage`,
its ``model_dump``, a :class:`~taskiq.message.BrokerMessage` and one ``XADD``
round trip per run: about a third of the daemon's CPU per message with the
queue on Redis. :class:`StreamEnqueuer` writes the same bytes a kicker
would (``{"task_id", "task_name", "labels", "labels_types", "args",
"kwargs"}``, orjson, as the broker's serializer does; a test compares them
with taskiq's own), and the ``XADD``\\ s of every run enqueued meanwhile go in
one pipeline (:class:`~flowerpower_daemon.state.batch.WriteBatch`). Each
``enqueue`` still returns only once its entry is in the stream: the daemon
acknowledges the MQTT message after that, never before (at least once).
"""

from __future__ import annotations

import orjson

from ..project.models import RunRequest
from ..state.batch import WriteBatch, WritePipeline

__all__ = ["StreamEnqueuer", "task_message"]


def task_message(task_name: str, request: RunRequest) -> bytes:
    """The stream entry's ``data`` for a run of ``task_name`` with ``request`` as its argument,
    as taskiq's kicker and formatter write it (no labels: the task is registered without)."""
    return orjson.dumps(
        {
            "task_id": request.run_id,
            "task_name": task_name,
            "labels": {},
            "labels_types": {},
            "args": [request.to_dict()],
            "kwargs": {},
        }
    )


class StreamEnqueuer:
    """``XADD``\\ s run requests to ``stream`` through ``batch`` (which the caller runs).

    ``maxlen``/``approximate`` are the broker's (taskiq-redis's ``XADD`` options).
    """

    def __init__(
        self,
        batch: WriteBatch,
        stream: str,
        task_name: str,
        *,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> None:
        self.batch = batch
        self.stream = stream
        self.task_name = task_name
        self.maxlen = maxlen
        self.approximate = approximate
        # XADD's words before the entry's fields, as redis-py's xadd writes them.
        trim: tuple[str | int, ...] = ()
        if maxlen is not None:
            trim = ("MAXLEN", "~", maxlen) if approximate else ("MAXLEN", maxlen)
        self._head: tuple[str | int, ...] = ("XADD", stream, *trim, "*")

    async def enqueue(self, request: RunRequest) -> None:
        """Return once ``request`` is in the stream; raise the error that kept it out."""
        data = task_message(self.task_name, request)
        head = self._head

        def stage(pipe: WritePipeline) -> object:
            return pipe.execute_command(*head, b"data", data)

        (reply,) = await self.batch.submit(stage)
        if isinstance(reply, BaseException):
            raise reply
