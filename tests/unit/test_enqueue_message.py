"""The daemon's stream entry is the message taskiq's own kicker would write, and taskiq reads it."""

from __future__ import annotations

import orjson

from flowerpower_daemon.project.models import RunRequest, TriggerInfo
from flowerpower_daemon.queue.broker import TASK_NAME, create_broker, register_run_task
from flowerpower_daemon.queue.enqueue import task_message
from flowerpower_daemon.settings import QueueSettings


def _request() -> RunRequest:
    return RunRequest(
        pipeline="temperature",
        inputs={"temperature": 21.5, "nested": {"a": [1, 2]}},
        overrides={"final_vars": ["device_id"]},
        run_id="r-123",
        trigger=TriggerInfo(name="temp", type="mqtt", topic="d/b1/temperature"),
        reply={"topic": "d/results"},
        dedup_key="k1",
        trace={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )


def test_task_message_is_what_taskiqs_kicker_writes() -> None:
    broker = create_broker(QueueSettings(broker="redis://127.0.0.1:1/0"))
    task = register_run_task(broker, executor=None)  # type: ignore[arg-type]  # never run
    request = _request()
    kicker = task.kicker().with_task_id(request.run_id)
    theirs = broker.formatter.dumps(kicker._prepare_message(request.to_dict())).message
    ours = task_message(TASK_NAME, request)
    assert orjson.loads(ours) == orjson.loads(theirs)
    # ... and taskiq's formatter reads ours back into the same task call
    message = broker.formatter.loads(ours)
    assert message.task_name == TASK_NAME and message.task_id == "r-123"
    assert RunRequest.from_dict(message.args[0]) == request


def test_enqueue_writes_the_xadd_redis_pys_builder_would() -> None:
    """The stage's command is redis-py's ``xadd`` with the broker's trim options, byte for byte."""
    from flowerpower_daemon.queue.enqueue import StreamEnqueuer
    from flowerpower_daemon.state._commands import Commands, pack

    request = _request()
    data = task_message(TASK_NAME, request)
    for maxlen, approximate in ((None, True), (1000, True), (500, False)):
        enqueuer = StreamEnqueuer(None, "q", TASK_NAME, maxlen=maxlen, approximate=approximate)  # type: ignore[arg-type]
        ours, theirs = Commands(), Commands()
        ours.execute_command(*enqueuer._head, b"data", data)
        theirs.xadd("q", {b"data": data}, maxlen=maxlen, approximate=approximate)
        assert pack(ours.stack) == pack(theirs.stack), (maxlen, approximate)
