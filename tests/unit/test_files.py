"""File-change trigger on the real filesystem: globs, depth, event kinds, readiness, stopping."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from flowerpower_daemon.sources import TriggerEvent, file_events
from flowerpower_daemon.sources.files import _collapse

QUIET = 0.5  # how long "no further event" is watched for


@asynccontextmanager
async def watching(
    path: Path, **kwargs: Any
) -> AsyncIterator[MemoryObjectReceiveStream[TriggerEvent]]:
    """Run ``file_events`` in a task until the block ends; yield once the watcher is ready."""
    send, receive = anyio.create_memory_object_stream[TriggerEvent](100)
    stop = anyio.Event()
    ready = anyio.Event()

    async def pump() -> None:
        async with (
            send,
            aclosing(
                file_events("drop", str(path), stop_event=stop, ready=ready.set, **kwargs)
            ) as events,
        ):
            async for event in events:
                await send.send(event)

    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            with anyio.fail_after(10):
                await ready.wait()
            try:
                yield receive
            finally:
                stop.set()


async def next_event(events: MemoryObjectReceiveStream[TriggerEvent]) -> TriggerEvent:
    with anyio.fail_after(10):
        return await events.receive()


async def assert_quiet(events: MemoryObjectReceiveStream[TriggerEvent]) -> None:
    with anyio.move_on_after(QUIET):
        event = await events.receive()
        pytest.fail(f"unexpected event {event}")


async def write(path: Path, text: str = "x") -> None:
    await anyio.Path(path).write_text(text)


async def test_new_matching_file_yields_one_added_event(tmp_path: Path) -> None:
    """A new file matching the glob is one ``added`` event with its absolute path."""
    async with watching(tmp_path, patterns=["*.csv"]) as events:
        await write(tmp_path / "a.csv", "a,b\n1,2\n")
        event = await next_event(events)
        await assert_quiet(events)
    path = str(tmp_path / "a.csv")
    assert (event.trigger, event.kind) == ("drop", "file")
    assert event.inputs == {"file_path": path, "file_event": "added"}
    assert event.meta == {"path": path, "event": "added"}


async def test_file_written_in_two_steps_is_one_event(tmp_path: Path) -> None:
    """Create, write, flush, write again: the batch collapses into a single ``added``."""
    target = tmp_path / "two.csv"

    def write_in_two_steps() -> None:
        with target.open("w") as f:
            f.write("head\n")
            f.flush()
            f.write("row\n")

    async with watching(tmp_path) as events:
        await anyio.to_thread.run_sync(write_in_two_steps)
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs["file_event"] == "added"


async def test_non_matching_file_yields_nothing(tmp_path: Path) -> None:
    """A file outside the globs is filtered out; the next matching one comes through."""
    async with watching(tmp_path, patterns=["*.csv", "*.json"]) as events:
        await write(tmp_path / "notes.txt")
        await anyio.sleep(0.3)
        await write(tmp_path / "b.json")
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs["file_path"] == str(tmp_path / "b.json")


async def test_modified_file_yields_modified(tmp_path: Path) -> None:
    """Rewriting an existing file is a ``modified`` event."""
    target = tmp_path / "data.csv"
    target.write_text("old\n")
    async with watching(tmp_path) as events:
        await write(target, "new\n")
        event = await next_event(events)
    assert event.inputs == {"file_path": str(target), "file_event": "modified"}


async def test_deleted_is_reported_only_when_requested(tmp_path: Path) -> None:
    """Deletes are ignored by default and reported with ``events=("deleted",)``."""
    (tmp_path / "gone.csv").write_text("x")
    (tmp_path / "gone2.csv").write_text("x")
    async with watching(tmp_path) as events:
        await anyio.Path(tmp_path / "gone.csv").unlink()
        await anyio.sleep(0.3)
        await write(tmp_path / "marker.csv")
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs["file_path"] == str(tmp_path / "marker.csv")

    async with watching(tmp_path, events=("deleted",)) as events:
        await write(tmp_path / "ignored.csv")
        await anyio.Path(tmp_path / "gone2.csv").unlink()
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs == {"file_path": str(tmp_path / "gone2.csv"), "file_event": "deleted"}


async def test_not_recursive_ignores_subdirectories(tmp_path: Path) -> None:
    """With ``recursive=False`` a file in a subdirectory is not reported."""
    (tmp_path / "sub").mkdir()
    async with watching(tmp_path, patterns=["*.csv"], recursive=False) as events:
        await write(tmp_path / "sub" / "deep.csv")
        await anyio.sleep(0.3)
        await write(tmp_path / "top.csv")
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs["file_path"] == str(tmp_path / "top.csv")


async def test_recursive_matches_relative_path_patterns(tmp_path: Path) -> None:
    """Recursively, a pattern may name the relative path; directories are never reported."""
    async with watching(tmp_path, patterns=["in/*.csv"]) as events:
        await anyio.Path(tmp_path / "in").mkdir()
        await write(tmp_path / "top.csv")
        await anyio.sleep(0.3)
        await write(tmp_path / "in" / "deep.csv")
        event = await next_event(events)
        await assert_quiet(events)
    assert event.inputs["file_path"] == str(tmp_path / "in" / "deep.csv")


async def test_ready_completes_task_group_start(tmp_path: Path) -> None:
    """``ready=task_status.started`` works: a change right after ``tg.start`` is reported."""
    seen: list[TriggerEvent] = []
    got = anyio.Event()

    async def source(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with aclosing(file_events("d", str(tmp_path), ready=task_status.started)) as ev:
            async for event in ev:
                seen.append(event)
                got.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(source)
            await write(tmp_path / "right-away.csv")
            await got.wait()
            tg.cancel_scope.cancel()
    assert seen[0].inputs["file_path"] == str(tmp_path / "right-away.csv")


async def test_stop_event_ends_iteration(tmp_path: Path) -> None:
    """Setting ``stop_event`` ends the iterator promptly."""
    stop = anyio.Event()
    ready = anyio.Event()
    got: list[TriggerEvent] = []

    async def consume() -> None:
        async with aclosing(
            file_events("d", str(tmp_path), stop_event=stop, ready=ready.set)
        ) as ev:
            got.extend([e async for e in ev])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await ready.wait()
            started = time.monotonic()
            stop.set()
    assert got == []
    assert time.monotonic() - started < 3.0


async def test_cancellation_stops_the_watcher_promptly(tmp_path: Path) -> None:
    """Cancelling a waiting iterator returns well before watchfiles' 5 s thread timeout."""
    ready = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async with aclosing(file_events("d", str(tmp_path), ready=ready.set)) as ev:
                    async for _ in ev:
                        pass

            tg.start_soon(consume)
            await ready.wait()
            started = time.monotonic()
            tg.cancel_scope.cancel()
    assert time.monotonic() - started < 3.0


async def test_missing_path_is_a_value_error(tmp_path: Path) -> None:
    """A path that does not exist is a ValueError naming it."""
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"nope.*does not exist"):
        async with aclosing(file_events("d", str(missing))) as ev:
            await ev.__anext__()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"events": ("created",)}, "unknown event"),
        ({"patterns": ()}, "patterns"),
        ({"debounce_ms": 0}, "debounce_ms"),
    ],
)
async def test_bad_arguments_are_value_errors(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """Unknown event names, no patterns or a zero debounce are rejected up front."""
    with pytest.raises(ValueError, match=message):
        async with aclosing(file_events("d", str(tmp_path), **kwargs)) as ev:
            await ev.__anext__()


@pytest.mark.parametrize(
    ("seen", "now", "expected"),
    [
        ({"added"}, "file", "added"),
        ({"added", "modified"}, "file", "added"),
        ({"modified", "deleted"}, "file", "modified"),
        ({"added", "deleted"}, None, "deleted"),
        ({"added"}, "dir", None),
        ({"deleted"}, None, "deleted"),
    ],
)
def test_collapse_rules(seen: set[Any], now: Any, expected: str | None) -> None:
    """One event per path and batch: gone wins, then added, then modified; dirs are skipped."""
    assert _collapse(seen, now) == expected
