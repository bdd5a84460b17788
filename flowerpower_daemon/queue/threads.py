"""The thread pool sync pipelines run in: as few threads as keep up, as many as are stuck.

A pipeline that is quick and CPU-bound (most of those an event triggers) holds
the GIL the whole time it runs, so a second thread cannot make it faster, only
slower: every thread that waits for the GIL makes the event loop's thread hand
it over at each of its system calls. ``ThreadPoolExecutor`` starts a new
thread whenever none is idle at the moment of a submit, so under load it runs
all ``max_workers`` threads and they take turns with the loop for the GIL:
measured with ``bench/e2e.py``'s daemon against itself, one thread instead of
eight gave 1.29x the messages per second at 0.79x the CPU per message.

A pipeline that waits (on a database, an HTTP call, a sleep) needs one thread
per concurrent run. So this pool starts with one thread and adds one, up to
``max_workers``, only while the oldest run not yet started has waited longer
than ``grow_after`` (20 ms: longer than the 5 ms a thread may wait for the
GIL, short next to a run that blocks). Threads are kept once started, as
``ThreadPoolExecutor`` keeps them.

An event loop hands a run over with :meth:`ElasticThreadPool.run_soon`: its
result comes back as an asyncio future, without the ``concurrent.futures.Future``
(a condition variable, its lock, a ``notify_all``) and the chained asyncio
future that ``run_in_executor`` makes per run. Results go back in batches
(:class:`_Returns`): the first result wakes the loop at once with one
``call_soon_threadsafe`` (a byte through its self-pipe), and those finished
before the loop gets to it ride along, so a busy loop is woken once per batch
rather than once per run, and no result waits for another.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["ElasticThreadPool"]

P = ParamSpec("P")
T = TypeVar("T")

# A run of any result type: the future's type parameter is the function's return type.
# A ``concurrent.futures.Future`` from ``submit``, an asyncio one from ``run_soon``.
# ``_Returns`` is where a ``run_soon`` run's outcome goes (``None`` for ``submit``).
_Item = tuple[
    Future[Any] | asyncio.Future[Any],
    Callable[..., object],
    tuple[object, ...],
    dict[str, object],
    "_Returns | None",
]
_Outcome = tuple["asyncio.Future[Any]", object, BaseException | None]

_ids = itertools.count(1)


class ElasticThreadPool(Executor):
    """A ``concurrent.futures`` executor that grows only when its threads are stuck."""

    def __init__(
        self, max_workers: int, *, grow_after: float = 0.02, name: str = "flowerpower-run"
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.grow_after = grow_after
        self._name = f"{name}-{next(_ids)}"
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        # When each run still waiting was submitted, oldest first. Appended by submit,
        # popped by the thread that takes a run (the queue is FIFO, so the two agree);
        # deque's append and popleft are atomic, so no lock on the hot path.
        self._waiting_since: deque[float] = deque()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self._submitted = 0  # written by the submitting thread only
        self._wake = threading.Event()
        self._parked = False  # the supervisor sleeps until a submit wakes it
        self._supervisor: threading.Thread | None = None
        #: Where ``run_soon`` outcomes go back to the loop that handed the last run over
        #: (a daemon has one loop; another loop gets its own).
        self._returns: _Returns | None = None

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        self._put((future, fn, args, kwargs, None))
        return future

    def run_soon(self, fn: Callable[..., T], /, *args: object) -> asyncio.Future[T]:
        """``fn(*args)`` in the pool, its outcome as a future of the running event loop.

        Call it from the loop's thread. Cancelling the future before a thread
        takes the run skips it; after, the run goes on and its outcome is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        returns = self._returns
        if returns is None or returns.loop is not loop:
            returns = self._returns = _Returns(loop)
        self._put((future, fn, args, {}, returns))
        return future

    def _put(self, item: _Item) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new runs after shutdown")
        self._submitted += 1
        self._waiting_since.append(time.monotonic())
        self._work.put(item)
        if not self._threads:
            with self._lock:
                if not self._threads:
                    self._start_thread()
                    self._supervisor = threading.Thread(
                        target=self._supervise, name=f"{self._name}-supervisor", daemon=True
                    )
                    self._supervisor.start()
        elif self._parked:
            self._wake.set()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._worker, name=f"{self._name}-{len(self._threads) + 1}", daemon=True
        )
        self._threads.append(thread)  # before it starts: counted once it can take a run
        thread.start()

    def _worker(self) -> None:
        get, taken = self._work.get, self._waiting_since.popleft
        while True:
            item = get()
            if item is None:
                return
            try:  # a plain try: contextlib.suppress costs an object per run
                taken()
            except IndexError:
                pass
            future, fn, args, kwargs, returns = item
            if isinstance(future, Future):
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            elif returns is not None and not future.cancelled():
                try:
                    returns.add((future, fn(*args), None))
                except BaseException as exc:
                    returns.add((future, None, exc))
            del item, future, fn, args, kwargs, returns  # no reference kept while waiting

    def _supervise(self) -> None:
        """Add a thread while the oldest waiting run has waited ``grow_after``.

        It looks every ``grow_after`` while runs come in (a wake-up per submit would
        cost more than the look), and parks after a quiet period, so that an idle
        daemon does not wake up 50 times a second.
        """
        seen = -1
        while not self._shutdown and len(self._threads) < self.max_workers:
            try:
                oldest = self._waiting_since[0]
            except IndexError:
                if self._submitted == seen:
                    self._parked = True
                    if not self._waiting_since:  # a submit may have come meanwhile
                        self._wake.wait(1.0)
                    self._wake.clear()
                    self._parked = False
                seen = self._submitted
                time.sleep(self.grow_after)
                continue
            late = oldest + self.grow_after - time.monotonic()
            if late > 0:
                time.sleep(late)
                continue
            with self._lock:
                if self._shutdown:
                    return
                self._start_thread()
            time.sleep(self.grow_after)  # let it take a run before judging again

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        self._wake.set()
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()
            if self._supervisor is not None:
                self._supervisor.join()


class _Returns:
    """The outcomes of one event loop's runs, on their way back to it in batches.

    A pool thread adds an outcome and wakes the loop only if no wake-up is pending;
    the loop clears that mark before it takes the outcomes, so an outcome added
    after it took them has woken it again. Both ends touch only a ``deque``
    (whose ``append`` and ``popleft`` are atomic) and a flag whose worst race is one
    wake-up too many.
    """

    __slots__ = ("_done", "_waking", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: deque[_Outcome] = deque()
        self._waking = False

    def add(self, outcome: _Outcome) -> None:
        """From a pool thread: hand ``(future, result, exception)`` back to the loop."""
        self._done.append(outcome)
        if not self._waking:
            self._waking = True
            try:
                self.loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed: nobody waits for it
                pass

    def _settle(self) -> None:
        """In the loop: set the futures of every outcome handed back (unless cancelled)."""
        self._waking = False
        done = self._done
        while done:
            future, result, exc = done.popleft()
            if future.cancelled():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)
