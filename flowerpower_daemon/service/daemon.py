"""Wiring and lifecycle: one task group owns every background task.

``Daemon.serve`` starts the MQTT link, the taskiq broker, and one source
task per trigger (``sources.py``: MQTT messages, timers, file watchers);
sources hand events to the dispatcher, which runs them through taskiq. The
first SIGTERM/SIGINT stops the sources, lets in-flight runs finish within
``shutdown_timeout`` and publish their results, then exits 0; a second
signal cancels at once. SIGHUP (or ``flowerpowerctl reload``) validates the
new config and project and applies the difference, or keeps the old one.

The control socket is claimed first (a second daemon on the same socket
refuses before it touches MQTT). The daemon is ready (``daemon_ready`` in
the log, ``READY=1`` to systemd, ``online`` on the status topic, control
commands accepted) once the MQTT link is connected and subscribed and every
source is armed: with the broker unreachable at start-up it keeps trying and
stays not ready. Every run goes through the job tracker (history, events,
``run --wait``, ``cancel``); the control plane's verbs live in
``controls.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup

from ..control.client import remember_socket
from ..dispatch.dispatcher import Dispatcher, Stats
from ..errors import ConfigError
from ..observe import metrics_for
from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..redact import redact_url
from ..settings import MqttSettings, Settings, Trigger
from ..state.dedup import dedup_store_for
from ..state.history import history_for
from ..state.pidlock import hold_state_dir
from ..version import __version__
from . import reload as reloading
from .check import (
    CheckReport,
    check,
    http_problems,
    redis_policy_problems,
    shared_timer_warnings,
    shown_as,
    split_problems,
    used_pipelines,
)
from .controls import Controls
from .lifecycle import freeze_heap, shielded
from .sources import Sources, subscriptions
from .systemd import Notifier

if TYPE_CHECKING:
    from ..mqtt.link import MqttLink
    from ..mqtt.outbox import Outbox
    from ..observe.server import HttpServer

__all__ = ["Daemon", "check"]

log = structlog.get_logger("flowerpower_daemon.daemon")

#: After a second signal, the seconds the cancelled runs' results and the ``offline``
#: status have to go out before everything is cancelled.
_CUT_SHORT_GRACE = 5.0


class Daemon:
    """Wires sources, dispatch, queue and sinks inside one task group."""

    def __init__(
        self,
        settings: Settings,
        project: FlowerPowerProject | None = None,
        *,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        project = project or FlowerPowerProject.load(
            settings.project, storage_options=settings.storage_options
        )
        # Only the pipelines the triggers run must be sound; the others are warned about.
        errors, unused = split_problems(project.problems, used_pipelines(settings))
        errors += redis_policy_problems(settings)  # policies the Redis queue cannot hold
        errors += http_problems(settings)  # http.listen without the metrics extra
        if errors:  # named by the config file, as `check` names them
            raise ConfigError(shown_as(errors, config_path))
        CheckReport([], unused, shared_timer_warnings(settings, project)).log_warnings()
        self.stats = Stats()
        self.notifier = Notifier()
        self.history = history_for(settings)
        #: The control plane: state and verbs (what ``flowerpowerctl`` acts on).
        self.controls = Controls(
            settings,
            project,
            config_path=config_path,
            stats=self.stats,
            history=self.history,
            notifier=self.notifier,
        )
        #: Instrumentation: counts only with ``http.listen`` (else its calls do nothing).
        self.metrics = metrics_for(settings.http.listen is not None)
        self.controls.jobs.metrics = self.metrics
        #: The run task group, while it exists (a second signal cancels it).
        self._runs: TaskGroup | None = None
        #: A second signal came: the runs were cancelled, the session is kept for them.
        self._cut_short = False

    @property
    def ready(self) -> bool:
        """True once MQTT is connected and subscribed and every source is armed."""
        return self.controls.ready

    def request_stop(self) -> None:
        """Begin a graceful shutdown (as SIGTERM)."""
        self.controls.request_stop()

    async def serve(self, *, ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`request_stop` or a signal; returns after a graceful shutdown."""
        from taskiq import InMemoryBroker

        from ..control.commands import Commands
        from ..control.server import ControlServer, socket_path
        from ..mqtt.link import MqttLink, status_payload_factory
        from ..mqtt.outbox import Outbox
        from ..queue.broker import (
            TASK_NAME,
            InProcessFormatter,
            InProcessRequest,
            RunExecutor,
            create_broker,
            register_run_task,
        )
        from ..queue.threads import ElasticThreadPool
        from ..state.timerstate import timer_state_for
        from .homeassistant import HomeAssistant, HomeAssistantSink

        s = self.settings
        controls = self.controls
        project = controls.project
        triggers = controls.triggers_at_start
        async with AsyncExitStack() as stack:
            # First: a second daemon on the same state dir or socket refuses before it
            # touches MQTT or a state file.
            stack.enter_context(hold_state_dir(s.state_path))
            server = ControlServer(
                s.control, socket_path(s.control, s.state_path), Commands(controls).handle
            )
            controls.server = server
            stack.enter_context(server.claim())
            stack.callback(self.notifier.close)
            await stack.enter_async_context(self.history)
            mqtt_settings = s.mqtt
            if s.mqtt.url == "embedded":
                from ..mqtt.embedded import embedded_broker

                mqtt_settings = await stack.enter_async_context(embedded_broker(s.mqtt))
            # Results waiting for the broker survive a restart (on disk, in the state dir).
            outbox = await stack.enter_async_context(
                Outbox(s.state_path / "outbox.sqlite3", max_size=s.mqtt.outbox_size)
            )
            link = MqttLink(
                mqtt_settings,
                subscriptions=subscriptions(triggers),
                receive_maximum=s.max_concurrent_runs,
                status_payload=status_payload_factory(
                    __version__, lambda: sorted(controls.project.pipelines), mqtt_settings.client_id
                ),
                # Past Receive Maximum (a broker may send more): every handler slot
                # filled plus one round of runs waiting, then the socket is not read.
                max_held=5 * s.max_concurrent_runs,
            )
            # Results go out on a connection of their own: the receiving one may pause its
            # socket, and must not hold back the PUBACKs the results' publishes wait for.
            publisher = MqttLink(
                mqtt_settings,
                client_id=f"{mqtt_settings.client_id}-results",
                outbox=outbox,
                companion=link,  # a broker outage is logged once, by `link`
            )
            sink = self.metrics.result_sink(
                publisher,
                qos=s.mqtt.result_qos,
                max_bytes=s.mqtt.max_result_bytes,
                result_store=s.mqtt.result_store,
            )
            controls.link, controls.publisher, controls.sink = link, publisher, sink
            # Results update their pipeline's Home Assistant sensor (when on): runs' through
            # _on_result, those of runs that ended without one (cancelled) through this sink.
            homeassistant = controls.homeassistant = HomeAssistant(s, publisher, mqtt_settings)
            controls.jobs.sink = HomeAssistantSink(sink, homeassistant)
            broker = create_broker(s.queue)
            if isinstance(broker, InMemoryBroker):
                # Sync pipelines run in a pool that adds threads only while runs are stuck
                # (see threads.py): quick runs on one thread do not fight over the GIL.
                pool = ElasticThreadPool(s.max_concurrent_runs)
                stack.callback(pool.shutdown, wait=False)
                project.runner.executor = pool
            # SQLite in the state dir; with Redis the workers claim keys as they start runs,
            # and this daemon answers duplicates of finished runs (see dedup.py). Open even
            # when no trigger has a dedup_key yet: a reload may add one.
            dedup = await stack.enter_async_context(dedup_store_for(s))
            timer_state = await stack.enter_async_context(timer_state_for(s))
            executor = RunExecutor(project.runner, sink, on_result=self._on_result, dedup=dedup)
            controls.executor = executor
            task = register_run_task(broker, executor)
            await broker.startup()
            stack.push_async_callback(shielded, broker.shutdown)
            if not s.queue.is_redis:
                await anyio.to_thread.run_sync(reloading.warm_up, project, triggers)

            formatter = broker.formatter
            in_process = formatter if isinstance(formatter, InProcessFormatter) else None
            enqueuer = None
            if s.queue.is_redis:
                from ..queue.enqueue import StreamEnqueuer
                from ..queue.streams import Reclaiming
                from ..state.batch import WriteBatch

                assert isinstance(broker, Reclaiming)
                # taskiq's message, written without its kicker; the XADDs of the runs
                # enqueued meanwhile share a round trip (see enqueue.py).
                enqueue_batch = await stack.enter_async_context(WriteBatch(s.queue.redis))
                enqueuer = StreamEnqueuer(
                    enqueue_batch,
                    broker.queue_name,
                    TASK_NAME,
                    maxlen=getattr(broker, "maxlen", None),
                    approximate=getattr(broker, "approximate", True),
                )

            async def kiq(request: RunRequest) -> object:
                if enqueuer is not None:
                    return await controls.jobs.run(request, partial(enqueuer.enqueue, request))
                # taskiq's task id is the run id: one id in logs, history and Redis
                # (and no uuid4, a getrandom system call, per run).
                kicker = task.kicker().with_task_id(request.run_id)
                arg = request.to_dict() if in_process is None else InProcessRequest(request)
                try:
                    return await controls.jobs.run(request, partial(kicker.kiq, arg))
                finally:
                    if in_process is not None:
                        in_process.forget(request.run_id)  # a kick that failed left it held

            hooks = await anyio.to_thread.run_sync(
                reloading.load_hooks, project, controls.triggers_at_start
            )
            dispatcher = Dispatcher(
                s,
                triggers,
                kiq=kiq,
                sink=sink,
                remote=s.queue.is_redis,
                stats=self.stats,
                config_hooks=hooks,
                dedup=dedup,
            )
            src = Sources(
                dispatcher,
                self.stats,
                timer_state,
                fired_once=controls.fired_once,
                stopping=lambda: controls.stopping,
                metrics=self.metrics,
            )
            http = await self._http(stack, outbox)
            async with anyio.create_task_group() as root:
                root.start_soon(self._signals, root, name="signals")
                await root.start(server.serve, name="control")
                await root.start(self.history.run, name="history")
                if http is not None:  # /readyz says "starting" until the daemon is ready
                    await root.start(http.serve, name="http")
                root.start_soon(self.notifier.watchdog, controls.status_line, name="watchdog")
                await root.start(controls.watch_workers, name="workers")
                await root.start(publisher.run, name="mqtt-results")
                if enqueuer is not None:
                    await root.start(enqueuer.batch.run, name="redis-enqueue")
                await root.start(link.run, name="mqtt-link")
                async with anyio.create_task_group() as runs:
                    self._runs = runs
                    async with anyio.create_task_group() as sources:
                        controls.attach(dispatcher=dispatcher, sources=src, runs=runs)
                        await src.run_all(sources, runs, link, triggers)
                        controls.manual.resume()
                        if await _first(partial(_connected, link), controls.stopped):
                            await self._announce_ready(link, mqtt_settings, triggers, ready)
                            # After READY, not before: a full collection of this heap takes
                            # ~0.1 s, housekeeping that need not delay the start.
                            freeze_heap()
                            pipelines = lambda: controls.project.pipelines  # noqa: E731
                            root.start_soon(homeassistant.start, pipelines, name="homeassistant")
                        await controls.stopped()
                        leaving = controls.leaving
                        log.info(
                            "daemon_stopping", in_flight=self.stats.in_flight, leave=leaving
                        )
                        self.notifier.stopping(controls.status_line())
                        controls.events.publish("stopping", in_flight=self.stats.in_flight)
                        if leaving:
                            leaving = await self._leave(link)
                        sources.cancel_scope.cancel()
                        controls.jobs.suspend_scheduled()
                    runs.cancel_scope.deadline = anyio.current_time() + s.shutdown_timeout
                self._runs = None
                with anyio.move_on_after(min(5.0, s.shutdown_timeout)):
                    await publisher.flush()
                # Unacked messages would go with the session: it stays for them instead.
                end = leaving and not self._cut_short and self._may_end_session(link)
                link.stop(end_session=end)
                publisher.stop(end_session=end)
                with anyio.move_on_after(10):
                    await link.wait_closed()
                    await publisher.wait_closed()
                root.cancel_scope.cancel()
        log.info("daemon_stopped", runs_ok=self.stats.runs_ok, runs_failed=self.stats.runs_failed)

    async def _leave(self, link: MqttLink) -> bool:
        """``flowerpowerctl stop --leave``: unsubscribe while the sources still run, so what
        the broker still sends this daemon is answered (within ``shutdown_timeout``), then
        the session may end at the disconnect (:meth:`_may_end_session`). A shared
        subscription's other members then get every new message, where a plain stop leaves
        the broker queueing this daemon's share in its session until it returns or the
        session expires. False when the subscriptions could not be ended."""
        with anyio.move_on_after(self.settings.shutdown_timeout) as scope:
            left = await link.leave()
        if not left:
            log.warning(
                "leave_failed",
                reason="not connected to the broker",
                hint="the broker keeps this daemon's subscriptions and session until"
                " mqtt.session_expiry: start it again to answer what waits there",
            )
            return False
        if scope.cancelled_caught:
            log.warning("leave_slow", unacked=link.held, waited_s=self.settings.shutdown_timeout)
        return True

    def _may_end_session(self, link: MqttLink) -> bool:
        """End the broker's session at the disconnect only when no message is unacked:
        the broker would drop those with it. Else keep it, and say so."""
        if link.held:
            log.warning(
                "leave_incomplete",
                unacked=link.held,
                hint="the broker keeps this daemon's session with its unacked messages"
                " (redelivered to it, not to the others): start it again with the same"
                " mqtt.client_id and state_dir to answer them",
            )
            return False
        log.info("daemon_left")
        return True

    async def _http(self, stack: AsyncExitStack, outbox: Outbox) -> HttpServer | None:
        """``http.listen``: the listener, bound now (a busy port stops the start-up with an
        error naming the key); None when off."""
        address = self.settings.http.address
        if address is None:
            return None
        from ..observe.endpoints import daemon_endpoints
        from ..observe.prom import PromMetrics
        from ..observe.server import HttpServer
        from ..observe.values import QueueDepth

        assert isinstance(self.metrics, PromMetrics)
        queue = self.settings.queue
        depth = await stack.enter_async_context(QueueDepth(queue)) if queue.is_redis else None
        endpoints = daemon_endpoints(
            self.controls,
            self.metrics,
            not_ready=self.controls.not_ready,
            dropped=lambda: outbox.dropped + outbox.failed,
            depth=depth,
        )
        server = HttpServer(address, endpoints.routes())
        await server.bind()
        return server

    async def _announce_ready(
        self,
        link: MqttLink,
        mqtt: MqttSettings,
        triggers: list[Trigger],
        ready: Callable[[], None] | None,
    ) -> None:
        """Connected, subscribed, sources armed: say so (status topic, log, systemd)."""
        s = self.settings
        # Ready for control commands before anyone can see `online`: a client that acts
        # on the retained status must not get "still starting".
        self.controls.set_ready(True)
        # The retained status says `online` only now: subscribed, timers armed.
        await link.announce_online()
        log.info(
            "daemon_ready",
            version=__version__,
            pipelines=sorted(self.controls.project.pipelines),
            triggers=[t.name for t in triggers],
            queue=redact_url(s.queue.broker),
            mqtt=f"{mqtt.host}:{mqtt.port}",
        )
        if self.controls.server is not None:  # flowerpowerctl finds it from any directory
            remember_socket(str(self.controls.server.path))
        self.notifier.ready(self.controls.status_line())
        if ready is not None:
            ready()

    async def _on_result(self, request: RunRequest, result: RunResult) -> None:
        if self.controls.dispatcher is not None:
            self.controls.dispatcher.record(request, result)
        await self.controls.jobs.finished(request, result)
        if self.controls.homeassistant is not None:
            await self.controls.homeassistant.publish_state(result)

    async def _signals(self, root: TaskGroup) -> None:
        """SIGHUP reloads; the first SIGTERM/SIGINT stops gracefully, the second cancels.
        A stop asked over the socket is not a first signal: ``systemctl stop`` during a
        ``flowerpowerctl stop --leave`` joins that stop instead of cutting it short."""
        signalled = False
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    root.start_soon(self._reload_logged, name="reload")
                    continue
                if signalled:
                    log.warning(
                        "second_signal_cancelling_now",
                        in_flight=self.stats.in_flight,
                        hint="the cancelled runs' messages stay unacked in the broker session:"
                        " they come again when this daemon (same client_id) starts",
                    )
                    self._cancel_now(root)
                    return
                signalled = True
                log.info(
                    "signal_received",
                    signal=signal.Signals(signum).name,
                    already_stopping=self.controls.stopping,
                )
                self.controls.request_stop()

    def _cancel_now(self, root: TaskGroup) -> None:
        """The second signal: cancel the runs now, not the daemon. Their ``cancelled``
        results still go out (the results link is running) and the links still say
        ``offline``, through the usual shutdown path, which ``root``'s deadline bounds
        should the broker not answer. Delayed manual runs are kept for the next start,
        and a ``--leave`` in progress keeps the session (the cancelled runs' messages
        come again)."""
        self._cut_short = True
        self.controls.jobs.suspend_scheduled()
        if self._runs is not None:
            self._runs.cancel_scope.cancel()
        deadline = anyio.current_time() + _CUT_SHORT_GRACE
        root.cancel_scope.deadline = min(root.cancel_scope.deadline, deadline)

    async def _reload_logged(self) -> None:
        """SIGHUP: reload, logging the outcome (the ctl command gets it as its answer)."""
        try:
            await self.controls.reload()
        except ConfigError as exc:
            log.error("reload_failed_keeping_old_config", problems=[str(p) for p in exc.problems])
        except Exception:
            log.exception("reload_crashed_keeping_old_config")


async def _connected(link: MqttLink) -> None:
    """Until ``link`` is connected and subscribed.

    Polled: ``MqttLink.wait_connected`` waits on an event the link replaces after
    each failed attempt, so a waiter that starts while the broker is down never wakes.
    """
    while not link.connected:
        with anyio.move_on_after(0.2):
            await link.wait_connected()


async def _first(
    wanted: Callable[[], Awaitable[None]], otherwise: Callable[[], Awaitable[None]]
) -> bool:
    """Wait for ``wanted()`` or ``otherwise()``, whichever ends first; True if ``wanted``."""
    won: list[bool] = []
    async with anyio.create_task_group() as tg:

        async def race(waiter: Callable[[], Awaitable[None]], is_wanted: bool) -> None:
            await waiter()
            won.append(is_wanted)
            tg.cancel_scope.cancel()

        tg.start_soon(race, wanted, True)
        tg.start_soon(race, otherwise, False)
    return won[0]
