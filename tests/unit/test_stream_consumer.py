"""The worker's stream loop: a run frees its slot once it has its result; taken runs are capped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

import anyio
import orjson
from structlog.testing import capture_logs
from taskiq import AckableMessage

from flowerpower_daemon.queue.broker import RUN_COMPUTED, TASK_NAME
from flowerpower_daemon.queue.consume import FINISHING, StreamConsumer


def _entry(i: int, acked: list[int]) -> AckableMessage:
    data = orjson.dumps({"task_id": str(i), "task_name": TASK_NAME, "args": [{"i": i}]})

    async def ack() -> None:
        acked.append(i)

    return AckableMessage(data=data, ack=ack)


async def test_slot_freed_at_result_and_taken_runs_capped() -> None:
    """concurrency 1: the next run computes while earlier results wait (their ack comes only
    when they are out), up to FINISHING runs taken; then reading waits."""
    acked: list[int] = []
    computing: list[int] = []
    out = anyio.Event()  # "the broker's PUBACK": releases every waiting result

    async def entries() -> AsyncGenerator[bytes | AckableMessage, None]:
        for i in range(10):
            yield _entry(i, acked)
        await anyio.sleep_forever()

    async def run(arg: Mapping[str, object]) -> None:
        computing.append(int(str(arg["i"])))
        computed = RUN_COMPUTED.get()
        assert computed is not None
        computed()  # the result is there; now it "waits for the PUBACK"
        await out.wait()

    consumer = StreamConsumer(entries, run, task_name=TASK_NAME, concurrency=1)
    finish = asyncio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            runs.start_soon(consumer.consume, finish, runs)
            while len(computing) < FINISHING:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            await anyio.sleep(0.1)
            assert computing == list(range(FINISHING))  # not more: the cap holds
            assert acked == [] and consumer.in_flight == FINISHING
            out.set()
            while len(acked) < 10:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            finish.set()
    assert sorted(acked) == list(range(10)) and consumer.in_flight == 0


async def test_a_run_that_raises_is_logged_and_acked() -> None:
    acked: list[int] = []

    async def entries() -> AsyncGenerator[bytes | AckableMessage, None]:
        yield _entry(1, acked)
        await anyio.sleep_forever()

    async def run(arg: Mapping[str, object]) -> None:
        raise RuntimeError("bug")

    consumer = StreamConsumer(entries, run, task_name=TASK_NAME, concurrency=2)
    finish = asyncio.Event()
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            runs.start_soon(consumer.consume, finish, runs)
            while not acked:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            finish.set()
    assert acked == [1]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["run_task_failed"]


async def _room_after(seconds: float, runs: int) -> tuple[int, int]:
    """``room()`` as the first read is made and as a read is made after ``runs`` runs of
    ``seconds`` each are done (concurrency 2: the reader holds one slot, one is free)."""
    acked: list[int] = []
    rooms: list[int] = []

    async def entries() -> AsyncGenerator[bytes | AckableMessage, None]:
        rooms.append(consumer.room())
        for i in range(runs):
            yield _entry(i, acked)
        while len(acked) < runs:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        rooms.append(consumer.room())
        await anyio.sleep_forever()

    async def run(arg: Mapping[str, object]) -> None:
        await anyio.sleep(seconds)

    consumer = StreamConsumer(entries, run, task_name=TASK_NAME, concurrency=2)
    finish = asyncio.Event()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.consume, finish, tg)
            while len(rooms) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            finish.set()
    return rooms[0], rooms[1]


async def test_a_read_takes_what_the_worker_starts_soon() -> None:
    """A read takes one entry per free slot (the reader's own and the other one) before any
    run and after runs of 0.2 s (more would wait while another worker idles); after runs of
    ~1 ms, also those its slots will start within 10 ms."""
    assert await _room_after(0.2, 4) == (2, 2)
    first, quick = await _room_after(0.001, 40)
    assert first == 2 and quick >= 4, quick
