"""The elastic run pool: one thread for quick runs, one per run while runs block, never
more than max_workers; results, errors, cancellation and shutdown as any executor."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import CancelledError, wait

import pytest

from flowerpower_daemon.queue.threads import ElasticThreadPool

TIMEOUT = 10.0


def test_quick_runs_stay_on_one_thread() -> None:
    pool = ElasticThreadPool(8, grow_after=0.5)  # a loaded machine may stall a thread a while
    try:
        for _ in range(20):
            futures = [pool.submit(pow, i, 2) for i in range(200)]
            _done, pending = wait(futures, timeout=TIMEOUT)
            assert not pending
            assert [f.result() for f in futures] == [i * i for i in range(200)]
        assert pool.threads == 1
    finally:
        pool.shutdown()


def test_blocking_runs_get_a_thread_each() -> None:
    # Each run waits until all four wait together: they finish only if four threads run.
    barrier = threading.Barrier(4, timeout=TIMEOUT)
    pool = ElasticThreadPool(4, grow_after=0.01)
    try:
        futures = [pool.submit(barrier.wait) for _ in range(4)]
        assert sorted(f.result(timeout=TIMEOUT) for f in futures) == [0, 1, 2, 3]
        assert pool.threads == 4
    finally:
        pool.shutdown()


def test_never_more_than_max_workers() -> None:
    release = threading.Event()
    pool = ElasticThreadPool(2, grow_after=0.01)
    try:
        futures = [pool.submit(release.wait, TIMEOUT) for _ in range(5)]
        deadline = time.monotonic() + TIMEOUT
        while sum(f.running() for f in futures) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # long enough for several more threads, were any allowed
        assert pool.threads == 2
        assert sum(f.running() for f in futures) == 2
        release.set()
        assert all(f.result(timeout=TIMEOUT) for f in futures)
    finally:
        release.set()
        pool.shutdown()


def test_errors_reach_the_caller_and_cancelled_runs_do_not_run() -> None:
    gate = threading.Event()
    ran: list[str] = []
    pool = ElasticThreadPool(1)
    try:
        first = pool.submit(gate.wait, TIMEOUT)
        skipped = pool.submit(ran.append, "skipped")
        assert skipped.cancel()
        failing = pool.submit(int, "not a number")
        gate.set()
        assert first.result(timeout=TIMEOUT)
        with pytest.raises(ValueError, match="invalid literal"):
            failing.result(timeout=TIMEOUT)
        with pytest.raises(CancelledError):
            skipped.result()
        assert ran == []
    finally:
        gate.set()
        pool.shutdown()


def test_shutdown_waits_for_running_runs_and_refuses_new_ones() -> None:
    pool = ElasticThreadPool(2)
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "done"

    future = pool.submit(slow)
    assert started.wait(TIMEOUT)
    pool.shutdown(wait=True)
    assert future.done() and future.result() == "done"
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(slow)


async def test_run_in_executor_with_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("the caller's")
    pool = ElasticThreadPool(2)
    try:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        seen = await asyncio.wait_for(loop.run_in_executor(pool, context.run, var.get), TIMEOUT)
        assert seen == "the caller's"
    finally:
        pool.shutdown()


async def test_run_soon_results_errors_context_and_cancellation() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("the caller's")
    pool = ElasticThreadPool(1, grow_after=10.0)  # one thread: runs go in order
    try:
        context = contextvars.copy_context()
        assert await asyncio.wait_for(pool.run_soon(context.run, var.get), TIMEOUT) == (
            "the caller's"
        )
        with pytest.raises(ZeroDivisionError):
            await asyncio.wait_for(pool.run_soon(divmod, 1, 0), TIMEOUT)
        # A run cancelled while it waits for the thread never runs.
        release = threading.Event()
        ran: list[str] = []
        blocker = pool.run_soon(release.wait, TIMEOUT)
        skipped = pool.run_soon(ran.append, "skipped")
        skipped.cancel()
        release.set()
        assert await asyncio.wait_for(blocker, TIMEOUT) is True
        assert await asyncio.wait_for(pool.run_soon(ran.append, "after"), TIMEOUT) is None
        assert ran == ["after"]
        # One cancelled while it runs: the run finishes, its outcome is dropped.
        release.clear()
        running = pool.run_soon(release.wait, TIMEOUT)
        await asyncio.sleep(0.05)
        running.cancel()
        release.set()
        assert await asyncio.wait_for(pool.run_soon(ran.append, "last"), TIMEOUT) is None
        assert running.cancelled() and ran == ["after", "last"]
    finally:
        pool.shutdown()


async def test_run_soon_results_finished_together_wake_the_loop_once() -> None:
    """Runs that finish while the loop is busy come back in one wake-up, every one of
    them, results and errors alike; a run finished after that wakes it again."""
    loop = asyncio.get_running_loop()
    wakeups: list[object] = []
    real = loop.call_soon_threadsafe

    def counting(callback: object, *args: object, **kwargs: object) -> asyncio.Handle:
        wakeups.append(callback)
        return real(callback, *args, **kwargs)  # type: ignore[arg-type]

    pool = ElasticThreadPool(1)
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        futures = [pool.run_soon(divmod, n, n % 5) for n in range(100)]
        deadline = time.monotonic() + TIMEOUT
        while not pool._work.empty() and time.monotonic() < deadline:  # the loop is busy
            time.sleep(0.01)  # noqa: ASYNC251 - the loop is to be busy meanwhile
        time.sleep(0.05)  # noqa: ASYNC251 - the last run finishes meanwhile
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), TIMEOUT)
        for n, outcome in enumerate(outcomes):
            if n % 5:
                assert outcome == divmod(n, n % 5)
            else:
                assert isinstance(outcome, ZeroDivisionError)
        assert len(wakeups) == 1, f"{len(wakeups)} wake-ups for 100 runs finished together"
        assert await asyncio.wait_for(pool.run_soon(divmod, 7, 2), TIMEOUT) == (3, 1)
        assert len(wakeups) == 2
    finally:
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        pool.shutdown()
