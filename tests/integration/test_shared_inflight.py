"""What Mosquitto does with a shared subscription's unacked QoS 1 messages when a member dies.

A measurement, kept as a test so that a broker upgrade that changes it shows
up here (README "Scaling out" states the result). One member (a subprocess,
persistent session, manual acks, never acks) and one acking member share
``$share/<group>/<topic>``. The first member is SIGKILLed holding its
messages unacked; we see where those messages go, where the messages
published while it is away go, and what it gets when it comes back.

Measured with Mosquitto 2.0.11 (20 messages, then 20 more while the member
is dead): it held 10 unacked; none went to the live member; of the 20
published while it was away the live member got 10 and 10 were queued for
the dead member's session; back (same client id, session present) it got
all 20: its 10 unacked again with DUP set, then the 10 queued.
With a session expiry of 1 s and the member never back: its unacked
messages and its queued share are dropped at expiry (the live member gets
none of them), and every later message goes to the live member.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.daemon_harness import client, unique

pytestmark = pytest.mark.timeout(60)

# A member that prints every message it gets ("<payload> dup=<0|1>") and never acks one.
_MEMBER = """
import sys
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, cid, filt, subscribe = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
expiry = int(sys.argv[5])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
c.manual_ack_set(True)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = expiry
props.ReceiveMaximum = 100

def on_connect(c, u, flags, rc, p):
    print(f"connected session_present={int(flags.session_present)}", flush=True)
    if subscribe:
        c.subscribe(filt, qos=1)
    else:
        print("subscribed", flush=True)

def on_subscribe(c, u, mid, rcs, p):
    print("subscribed", flush=True)

def on_message(c, u, m):
    print(f"{m.payload.decode()} dup={int(m.dup)}", flush=True)

c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", port, clean_start=False, properties=props)
c.loop_forever()
"""


class Member:
    """The never-acking member as a child process; its lines are read by a thread."""

    def __init__(self, port: int, cid: str, filt: str, subscribe: bool, expiry: int) -> None:
        args = [str(port), cid, filt, "1" if subscribe else "0", str(expiry)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MEMBER, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._line = anyio.Event()  # set (and replaced) at every line

    async def read(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        task_status.started()
        while True:
            try:
                line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
            except ValueError:  # closed by member() once the process is gone
                return
            if not line:
                return
            self.lines.append(line.strip())
            self._line.set()
            self._line = anyio.Event()

    @property
    def received(self) -> dict[str, int]:
        """payload -> dup flag of each message received."""
        out = {}
        for line in self.lines:
            if " dup=" in line:
                payload, _, dup = line.partition(" dup=")
                out[payload] = int(dup)
        return out

    async def wait_for(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds after some line (callers bound it)."""
        while not done():
            await self._line.wait()

    async def wait_line(self, text: str) -> None:
        with anyio.fail_after(10):
            await self.wait_for(lambda: any(line.startswith(text) for line in self.lines))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)


@contextmanager
def member(
    port: int, cid: str, filt: str, *, subscribe: bool, expiry: int = 300
) -> Iterator[Member]:
    m = Member(port, cid, filt, subscribe, expiry)
    try:
        yield m
    finally:
        if m.proc.poll() is None:
            m.kill()
        assert m.proc.stdout is not None
        m.proc.stdout.close()


async def _read(c: Any, into: set[str], *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Every payload ``c`` receives, for the whole test (a cancelled iteration of aiomqtt's
    ``messages`` can drop the message in hand)."""
    task_status.started()
    async for msg in c.messages:
        into.add(bytes(msg.payload).decode())


async def test_mosquitto_shared_subscription_inflight_on_member_death(mosquitto: Any) -> None:
    """Mosquitto 2.0: a dead member's unacked messages, and its share of new ones, wait for
    its session to come back; none goes to the live member."""
    topic = unique("shared")
    filt = f"$share/{unique('g')}/{topic}"
    cid = unique("member")
    got: set[str] = set()  # by the acking member
    async with anyio.create_task_group() as tg:
        with member(mosquitto.port, cid, filt, subscribe=True) as m1:
            await tg.start(m1.read)
            await m1.wait_line("subscribed")
            async with client(mosquitto.port) as m2, client(mosquitto.port) as pub:
                await m2.subscribe(filt, qos=1)
                async with anyio.create_task_group() as reading:
                    await reading.start(_read, m2, got)
                    for i in range(20):
                        await pub.publish(topic, f"a{i}".encode(), qos=1)
                    await anyio.sleep(1.0)
                    held, other = set(m1.received), set(got)
                    assert held and other, (held, other)  # both members got some
                    assert held | other == {f"a{i}" for i in range(20)}
                    m1.kill()  # dies holding `held` unacked
                    await anyio.sleep(2.0)
                    redelivered_to_other = held & got
                    # Published while the first member is away (its session persists).
                    for i in range(20):
                        await pub.publish(topic, f"b{i}".encode(), qos=1)
                    await anyio.sleep(2.0)
                    away = {p for p in got if p.startswith("b")}
                    with member(mosquitto.port, cid, filt, subscribe=False) as back:
                        await tg.start(back.read)
                        await back.wait_line("connected")
                        with anyio.move_on_after(2.0):
                            await back.wait_for(
                                lambda: len(back.received) >= len(held) + 20 - len(away)
                            )
                        returned = back.received
                        session_present = back.lines[0]
                    reading.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    b_all = {f"b{i}" for i in range(20)}
    print(
        f"held by the dead member: {len(held)}; of those redelivered to the other member: "
        f"{len(redelivered_to_other)}; published while away: 20, to the other member: "
        f"{len(away)}; the returning member got {len(returned)} "
        f"({sum(returned.values())} with DUP), {session_present}"
    )
    # Measured with Mosquitto 2.0.11: the unacked messages stay with the dead member's
    # session (nothing goes to the live member) and come back, DUP set, when it returns...
    assert not redelivered_to_other
    assert held <= set(returned)
    assert all(returned[p] == 1 for p in held)
    # ...and while it is away, it keeps its round-robin share of new messages: they are
    # queued for its session (not given to the live member) and come when it returns.
    assert away and away < b_all
    assert set(returned) == held | (b_all - away)
    assert all(returned[p] == 0 for p in b_all - away)
    assert session_present == "connected session_present=1"


async def test_mosquitto_drops_a_dead_members_messages_when_its_session_expires(
    mosquitto: Any,
) -> None:
    """Mosquitto 2.0: when the dead member's session expires, its unacked and queued
    messages are gone; the live member does not get them."""
    topic = unique("shared")
    filt = f"$share/{unique('g')}/{topic}"
    cid = unique("member")
    got: set[str] = set()
    async with anyio.create_task_group() as tg:
        with member(mosquitto.port, cid, filt, subscribe=True, expiry=1) as m1:
            await tg.start(m1.read)
            await m1.wait_line("subscribed")
            async with client(mosquitto.port) as m2, client(mosquitto.port) as pub:
                await m2.subscribe(filt, qos=1)
                async with anyio.create_task_group() as reading:
                    await reading.start(_read, m2, got)
                    for i in range(20):
                        await pub.publish(topic, f"a{i}".encode(), qos=1)
                    await anyio.sleep(1.0)
                    held = set(m1.received)
                    assert held and got
                    m1.kill()
                    for i in range(20):  # at once: some are queued for the dead member
                        await pub.publish(topic, f"b{i}".encode(), qos=1)
                    await anyio.sleep(3.0)  # its session (1 s) has expired
                    for i in range(20):
                        await pub.publish(topic, f"c{i}".encode(), qos=1)
                    await anyio.sleep(1.0)
                    reading.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    lost = {f"b{i}" for i in range(20)} - got
    print(
        f"held by the dead member: {len(held)}, to the live member after expiry: "
        f"{len(held & got)}; published while it was away (before expiry): 20, to the live "
        f"member: {20 - len(lost)}; after expiry: {len({p for p in got if p[0] == 'c'})} of 20"
    )
    assert not held & got  # its unacked messages never reach the live member
    assert lost  # nor does its share of those published before the session expired
    assert {f"c{i}" for i in range(20)} <= got  # after expiry the live member gets all
