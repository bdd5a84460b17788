"""The admission chain: stages only for the policies a trigger uses, rejections handled in one place."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import orjson
import pytest
from structlog.testing import capture_logs

from flowerpower_daemon.dispatch.decode import Decode
from flowerpower_daemon.dispatch.dedup import Dedup
from flowerpower_daemon.dispatch.dispatcher import Dispatcher
from flowerpower_daemon.dispatch.overlap import SKIP_WHILE_RUNNING
from flowerpower_daemon.dispatch.perkey import PerKey
from flowerpower_daemon.project.models import RunRequest, RunResult
from flowerpower_daemon.settings import CronTrigger, MqttTrigger, Settings
from flowerpower_daemon.sources.base import TriggerEvent
from flowerpower_daemon.state.dedup import SqliteDedupStore


class _Sink:
    """Keeps what the dispatcher emits (error results, replaced runs)."""

    def __init__(self) -> None:
        self.results: list[tuple[RunRequest, RunResult]] = []

    async def emit(self, request: RunRequest, result: RunResult) -> None:
        self.results.append((request, result))


class _Acks:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


def _mqtt(**options: object) -> MqttTrigger:
    return MqttTrigger.model_validate(
        {"name": "t", "type": "mqtt", "pipeline": "p", "topic": "s/{device}", **options}
    )


def _event(payload: bytes, acks: _Acks, device: str = "d1") -> TriggerEvent:
    fields = {"device": device}
    return TriggerEvent(
        "t",
        "mqtt",
        payload=payload,
        inputs=fields,
        meta={"topic": f"s/{device}", "fields": fields},
        ack=acks,
    )


def test_a_trigger_gets_only_the_stages_it_asks_for(tmp_path: Path) -> None:
    """Plain MQTT: decode only; a timer: none; every policy: decode, dedup, skip, per-key in order."""
    dedup = SqliteDedupStore(tmp_path / "d.sqlite3")
    cron = CronTrigger.model_validate(
        {"name": "c", "type": "cron", "pipeline": "p", "cron": "* * * * *"}
    )
    full = _mqtt(name="f", dedup_key="{payload.id}", overlap="skip", key="{device}")
    d = Dispatcher(
        Settings(), [_mqtt(), cron, full], kiq=_never, sink=_Sink(), remote=False, dedup=dedup
    )
    assert [type(s) for s in d.triggers["t"].chain] == [Decode]
    assert d.triggers["c"].chain == ()
    chain = d.triggers["f"].chain
    assert [type(s) for s in chain] == [Decode, Dedup, type(SKIP_WHILE_RUNNING), PerKey]


async def _never(request: RunRequest) -> None:
    raise AssertionError(f"ran {request.run_id}")


async def test_bad_payload_is_one_error_result_one_count_one_ack() -> None:
    """A payload the trigger refuses: a PayloadError result, bad_input + 1, acked once, logged."""
    sink, acks = _Sink(), _Acks()
    d = Dispatcher(Settings(), [_mqtt(payload_input=None)], kiq=_never, sink=sink, remote=False)
    async with anyio.create_task_group() as runs:
        with capture_logs() as logs:
            await d.submit(_event(b"[1, 2]", acks), runs)
    [(request, result)] = sink.results
    assert result.error is not None and result.error.type == "PayloadError"
    assert result.error.message.startswith("payload must be a JSON object, got a JSON array")
    assert request.reply["error_topic"] == "flowerpower/errors/p"
    assert (d.stats.bad_input, d.stats.runs_failed, d.triggers["t"].failed) == (1, 1, 1)
    assert acks.count == 1
    assert [entry["event"] for entry in logs] == ["bad_payload"]
    assert logs[0]["topic"] == "s/d1"


async def test_a_skipped_message_gives_its_dedup_key_back(tmp_path: Path) -> None:
    """overlap: skip after the dedup claim: the skipped message's key is released, not kept."""
    started, release = anyio.Event(), anyio.Event()

    async def kiq(request: RunRequest) -> None:
        started.set()
        await release.wait()

    trigger = _mqtt(dedup_key="{payload.id}", overlap="skip")
    acks = _Acks()
    async with SqliteDedupStore(tmp_path / "d.sqlite3") as dedup:
        d = Dispatcher(Settings(), [trigger], kiq=kiq, sink=_Sink(), remote=False, dedup=dedup)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as runs:
                await d.submit(_event(orjson.dumps({"id": 1}), acks), runs)
                await started.wait()
                await d.submit(_event(orjson.dumps({"id": 2}), acks), runs)
                assert (d.stats.skipped, acks.count) == (1, 1)
                release.set()
        assert (await dedup.claim("t:2", "again", 60))[0] == "new"
        assert (await dedup.claim("t:1", "again", 60))[0] == "running"  # ran, never completed here
    assert acks.count == 2


async def test_skip_sees_a_run_whose_task_has_not_started_yet() -> None:
    """overlap: skip with two events handed over in one loop turn (a burst read at once):
    the second is skipped, though the first run's task has not started when it comes."""
    ran: list[str] = []

    async def kiq(request: RunRequest) -> None:
        ran.append(request.run_id)

    acks = _Acks()
    d = Dispatcher(Settings(), [_mqtt(overlap="skip")], kiq=kiq, sink=_Sink(), remote=False)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            await d.submit(_event(b"{}", acks), runs)
            await d.submit(_event(b"{}", acks), runs)  # no checkpoint in between
            assert d.stats.skipped == 1
    assert len(ran) == 1 and acks.count == 2
    assert d.triggers["t"].running == {}  # the run's mark is gone with it
    async with anyio.create_task_group() as runs:  # and the next event runs
        await d.submit(_event(b"{}", acks), runs)
    assert len(ran) == 2


@pytest.mark.parametrize(
    ("options", "payload", "message"),
    [
        (
            {"dedup_key": "{payload.id}"},
            b"{}",
            "dedup_key '{payload.id}': no value for {payload.id}",
        ),
        ({"key": "{payload.sensor}"}, b"{}", "key: dedup_key '{payload.sensor}': no value"),
    ],
)
async def test_missing_template_values_are_bad_input(
    tmp_path: Path, options: dict[str, object], payload: bytes, message: str
) -> None:
    """A dedup_key or key naming a value the message lacks: an error result with that reason."""
    sink, acks = _Sink(), _Acks()
    async with SqliteDedupStore(tmp_path / "d.sqlite3") as dedup:
        d = Dispatcher(
            Settings(), [_mqtt(**options)], kiq=_never, sink=sink, remote=False, dedup=dedup
        )
        async with anyio.create_task_group() as runs:
            await d.submit(_event(payload, acks), runs)
    [(_, result)] = sink.results
    assert result.error is not None and result.error.message.startswith(message)
    assert (d.stats.bad_input, acks.count) == (1, 1)


class _BrokenStore(SqliteDedupStore):
    """A dedup store whose disk fails (full, I/O error) on every claim."""

    async def claim(self, *args: object, **kwargs: object) -> tuple[str, bytes | None]:
        raise OSError(28, "No space left on device")


async def test_a_failing_stage_fails_the_event_not_the_daemon(tmp_path: Path) -> None:
    """A store that raises: logged, counted, the message left unacked for redelivery; no crash."""
    acks = _Acks()
    trig = _mqtt(dedup_key="{payload.id}")
    d = Dispatcher(
        Settings(),
        [trig],
        kiq=_never,
        sink=_Sink(),
        remote=False,
        dedup=_BrokenStore(tmp_path / "d.sqlite3"),
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as runs:
            await d.submit(_event(b'{"id": 1}', acks), runs)
    assert acks.count == 0  # the broker keeps it: at least once
    assert d.triggers["t"].failed == 1
    [failed] = [e for e in logs if e["event"] == "admission_failed"]
    assert "No space left on device" in failed["error"]


async def test_plain_trigger_events_are_carried_by_at_most_one_task_per_slot() -> None:
    """Events of a trigger with no limit of its own run in order through at most
    max_concurrent_runs tasks; each is run, acked and its handler slot given back."""
    settings = Settings.model_validate({"max_concurrent_runs": 2})
    release = anyio.Event()
    ran: list[str] = []
    running = 0
    most = 0

    async def kiq(request: RunRequest) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        ran.append(request.inputs["n"])  # type: ignore[arg-type]
        running -= 1

    d = Dispatcher(settings, [_mqtt()], kiq=kiq, sink=_Sink(), remote=False)
    acks = _Acks()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            for n in range(6):
                await d.submit(_event(orjson.dumps({"n": str(n)}), acks), runs)
            await anyio.sleep(0.05)
            assert d.carriers.count == 2 and len(d.carriers.queued) == 4 and running == 2
            release.set()
    assert sorted(ran) == [str(n) for n in range(6)] and set(ran[2:4]) == {"2", "3"}  # oldest first
    assert most == 2 and acks.count == 6 and d.carriers.count == 0 and not d.carriers.queued
    assert d.stats.in_flight == 0
    # Every handler slot came back: as many events as the bound can be held again.
    for _ in range(settings.max_concurrent_runs * 4):
        d._pending.acquire_nowait()


async def test_an_idle_carrier_takes_the_next_event_then_ends() -> None:
    """Events one after another run in the same carrier task while it lingers; an idle
    carrier ends after the linger, so nothing is left to stop."""
    tasks: list[object] = []
    done = anyio.Event()

    async def kiq(request: RunRequest) -> None:
        tasks.append(asyncio.current_task())
        done.set()

    d = Dispatcher(Settings(), [_mqtt()], kiq=kiq, sink=_Sink(), remote=False)
    acks = _Acks()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as runs:
            for n in range(3):
                done = anyio.Event()
                await d.submit(_event(orjson.dumps({"n": n}), acks), runs)
                await done.wait()
            assert d.carriers.count == 1
    assert len(tasks) == 3 and len(set(map(id, tasks))) == 1 and acks.count == 3
    assert d.carriers.count == 0
