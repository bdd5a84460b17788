"""``worker --processes N`` leaves no orphans: a supervisor that fails stops the children it
started, and a child stops when its parent dies (SIGKILL included). Real processes; the
worker-on-Redis case is tests/integration/test_worker_supervisor.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from flowerpower_daemon.service.supervisor import PARENT_ENV, Supervisor, _reason

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class _FailingThird(Supervisor):
    """Spawning the third child fails, as fork does when the system is out of processes."""

    def __init__(self) -> None:
        super().__init__(SLEEPER, 3, grace=5)
        self.pids: list[int] = []

    async def _spawn(self, env: dict[str, str]) -> anyio.abc.Process:
        if len(self.pids) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        proc = await super()._spawn(env)
        self.pids.append(proc.pid)
        return proc


def test_a_failed_spawn_stops_the_children_already_started() -> None:
    supervisor = _FailingThird()
    with pytest.raises((OSError, BaseExceptionGroup)) as caught:  # anyio may group it
        anyio.run(supervisor.run)
    assert _reason(caught.value) == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert len(supervisor.pids) == 2
    assert gone_within(supervisor.pids, 1), "the started children outlived the failure"


# A parent that starts a child (as the supervisor does: PARENT_ENV, die_with_parent) and
# prints its pid; the child sleeps. ``nopdeathsig``: the fallback of other systems.
_PARENT = """
import os, subprocess, sys, time
from flowerpower_daemon.service.supervisor import PARENT_ENV
child = '''
import sys, time
from flowerpower_daemon.service import supervisor
if sys.argv[1] == "nopdeathsig":
    supervisor._pdeathsig = lambda sig: False
    supervisor._PARENT_POLL = 0.1
supervisor.die_with_parent()
time.sleep(120)
'''
env = {**os.environ, PARENT_ENV: str(os.getpid())}
proc = subprocess.Popen([sys.executable, "-c", child, sys.argv[1]], env=env)
print(proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["pdeathsig", "nopdeathsig"])
def test_a_child_stops_when_its_parent_is_killed(how: str) -> None:
    if how == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux only")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, how], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(1.0)  # the child imported the module and asked for the signal
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert gone_within([child], 10), f"child {child} outlived its parent ({how})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_child_whose_parent_is_already_gone_exits() -> None:
    """The parent died between the spawn and the child's request: the child exits at once."""
    code = "from flowerpower_daemon.service.supervisor import die_with_parent; die_with_parent()"
    env = {**os.environ, PARENT_ENV: "1" if os.getppid() != 1 else "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code + "; print('still here')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "still here" not in proc.stdout
