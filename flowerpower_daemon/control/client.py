"""``flowerpowerctl``: steer a running daemon over its control socket.

``flowerpowerctl [--socket PATH] [--json] COMMAND ...``; human-readable tables
by default, the daemon's JSON answer with ``--json`` (one object; ``events``
prints one JSON object per line).

Socket: ``--socket``, else ``$FLOWERPOWER_CONTROL__SOCKET``, else
``$RUNTIME_DIRECTORY/control.sock``, else the first that exists of
``/run/flowerpower-daemon/control.sock``, ``.flowerpower/control.sock`` in
this directory or a parent, and the socket named in the per-user pointer
file (:func:`pointer_file`) a daemon leaves with :func:`remember_socket`;
else ``./.flowerpower/control.sock``.

Exit codes, for scripts:

== =====================================================================
0  done
1  the daemon answered with an error (unknown job, bad cron, reload refused ...)
2  bad command line
3  no daemon: the socket is missing, refuses or is not ours to use
4  ``run --wait``: the run finished, but not successfully (failed, timeout, cancelled)
== =====================================================================

This module imports only the standard library, anyio and orjson: no
Hamilton, taskiq, pydantic-settings or pandas, so an answer takes tens of
milliseconds, not the daemon's start-up second.
:class:`ControlClient` is the async client behind it, usable from any
anyio/asyncio program.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence

import anyio
import anyio.to_thread
import orjson
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ..argtypes import (
    Parser,
    add_run_options,
    cron_arg,
    interval_arg,
    parse_seconds,
    run_overrides,
)
from .completion import CompletionUnavailable, add_completion_command, complete, hook
from .protocol import dump_line

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CommandError",
    "ControlClient",
    "UnreachableError",
    "default_socket",
    "main",
    "pointer_file",
    "remember_socket",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_RUN_FAILED = 0, 1, 2, 3, 4

MAX_ANSWER_BYTES = 256 * 1024 * 1024


class CommandError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str, details: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class UnreachableError(Exception):
    """No daemon answers on the socket (missing, refused, forbidden, closed early)."""


def pointer_file(env: Mapping[str, str] | None = None) -> str:
    """The per-user file naming the socket of the daemon started last (see :func:`remember_socket`).

    ``$XDG_RUNTIME_DIR/flowerpower-daemon/socket`` (a directory only this
    user can enter), else ``~/.cache/flowerpower-daemon/socket``.
    """
    env = os.environ if env is None else env
    root = env.get("XDG_RUNTIME_DIR") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    return os.path.join(root, "flowerpower-daemon", "socket")


def remember_socket(path: str, env: Mapping[str, str] | None = None) -> None:
    """Record ``path`` in :func:`pointer_file` so ``flowerpowerctl`` finds it from any directory.

    For the daemon, once its socket listens; best effort (an unwritable
    home only means ``--socket`` is needed).
    """
    target = pointer_file(env)
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        tmp = f"{target}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(os.path.abspath(path) + "\n")
        os.replace(tmp, target)
    except OSError:
        pass


def default_socket(env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """Where the daemon's socket is, when ``--socket`` is not given (see the module doc)."""
    env = os.environ if env is None else env
    if env.get("FLOWERPOWER_CONTROL__SOCKET"):
        return env["FLOWERPOWER_CONTROL__SOCKET"]
    if env.get("RUNTIME_DIRECTORY"):
        return os.path.join(env["RUNTIME_DIRECTORY"].split(":")[0], "control.sock")
    system = "/run/flowerpower-daemon/control.sock"
    if os.path.exists(system):
        return system
    here = os.path.abspath(cwd or os.getcwd())
    while True:
        candidate = os.path.join(here, ".flowerpower", "control.sock")
        if os.path.exists(candidate):
            return candidate if cwd else os.path.relpath(candidate)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    try:
        with open(pointer_file(env), encoding="utf-8") as fh:
            remembered = fh.read().strip()
    except OSError:
        remembered = ""
    if remembered and os.path.exists(remembered):
        return remembered
    return os.path.join(".flowerpower", "control.sock")


class ControlClient:
    """One connection: ``async with ControlClient(path) as c: await c.call("status")``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._stream: SocketStream | None = None
        self._reader: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._stream = await anyio.connect_unix(self.path)
        except OSError as exc:
            raise UnreachableError(
                f"cannot connect to {self.path}: {exc.strerror or exc}"
            ) from None
        self._reader = BufferedByteReceiveStream(self._stream)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def _send(self, cmd: str, args: Mapping[str, object] | None) -> int:
        assert self._stream is not None
        request_id = next(self._ids)
        message = {"id": request_id, "cmd": cmd, "args": dict(args or {})}
        try:
            await self._stream.send(dump_line(message))
        except (anyio.BrokenResourceError, OSError) as exc:
            raise UnreachableError(f"the daemon closed the connection: {exc}") from None
        return request_id

    async def _receive(self) -> dict[str, object]:
        assert self._reader is not None
        try:
            line = await self._reader.receive_until(b"\n", MAX_ANSWER_BYTES)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            raise UnreachableError("the daemon closed the connection without an answer") from None
        message = orjson.loads(line)
        if not isinstance(message, dict):
            raise UnreachableError(f"not a protocol answer: {line[:200]!r}")
        return message

    async def _answer(self, request_id: int) -> object:
        message = await self._receive()
        if message.get("ok") is False:
            error = message.get("error")
            if not isinstance(error, dict):
                error = {}
            raise CommandError(
                str(error.get("code", "?")), str(error.get("message", "")), error.get("details")
            )
        if message.get("id") != request_id:
            raise UnreachableError(
                f"answer to request {message.get('id')!r}, expected {request_id}"
            )
        return message.get("result")

    async def call(self, cmd: str, args: Mapping[str, object] | None = None) -> object:
        """Send one request and return its result (raises :class:`CommandError`).

        The result is the answer's JSON value, as control/protocol.py describes it per
        command; narrow it (``isinstance``) before use.
        """
        return await self._answer(await self._send(cmd, args))

    async def stream(
        self, cmd: str, args: Mapping[str, object] | None = None
    ) -> AsyncIterator[Mapping[str, object]]:
        """Send a streaming request and yield each event until the daemon closes."""
        request_id = await self._send(cmd, args)
        await self._answer(request_id)
        while True:
            try:
                message = await self._receive()
            except UnreachableError:
                return
            event = message.get("event")
            if isinstance(event, Mapping):
                yield event


# ---------------------------------------------------------------- the command


def _err(text: str) -> None:
    from .render import printable

    sys.stderr.write(printable(text) + "\n")


def parse_duration(text: str) -> float:
    """``"90s"``, ``"5m"``, ``"1h30m"`` -> seconds, as an argparse ``type=``."""
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = Parser(
        prog="flowerpowerctl",
        description="Steer a running flowerpower-daemon over its control socket.",
        epilog="exit codes: 0 ok, 1 error answer, 2 usage, 3 daemon unreachable, "
        "4 run --wait finished unsuccessfully",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--socket", "-s", default=None, help="control socket path")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.add_argument(
        "--timeout",
        dest="answer_timeout",
        type=parse_duration,
        default=None,
        help="give up after this long (default 30s; none for run --wait, stop --wait and events)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser(
        "status", help="version, uptime, MQTT and queue state, counters, active runs"
    )
    status.add_argument(
        "--fleet",
        action="store_true",
        help="also every daemon's retained status on the broker and the live workers",
    )
    sub.add_parser("ping", help="check that the daemon answers")
    sub.add_parser("pipelines", help="the project's pipelines and their triggers")
    sub.add_parser("triggers", help="every trigger with next fire time, paused state, counters")

    run = sub.add_parser("run", help="run a pipeline now or later; prints the job id")
    run.add_argument("pipeline", help="pipeline name")
    add_run_options(run)
    when = run.add_mutually_exclusive_group()
    when.add_argument("--run-in", type=parse_duration, default=None, help="delay, e.g. 5m")
    when.add_argument("--run-at", default=None, help="ISO 8601 time (naive = UTC)")
    run.add_argument("--wait", action="store_true", help="wait and print the result")

    jobs = sub.add_parser("jobs", help="active runs and the job history, newest first")
    jobs.add_argument("--pipeline", default=None)
    jobs.add_argument(
        "--state",
        default=None,
        choices=("scheduled", "queued", "running", "success", "failed", "cancelled", "timeout"),
    )
    jobs.add_argument("--limit", type=int, default=20)
    job = sub.add_parser("job", help="one job with its full result")
    job.add_argument("id")
    runs = sub.add_parser("runs", help="one run, and a picture of what it executed")
    rsub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rshow = rsub.add_parser(
        "show", help="a run with its result (as job); --dag FILE draws the DAG path it ran"
    )
    rshow.add_argument("id", help="run id (flowerpowerctl jobs lists them)")
    rshow.add_argument(
        "--dag",
        metavar="FILE",
        default=None,
        help="draw the run's DAG path to FILE (format from its suffix; - for stdout); "
        "needs Graphviz's dot here and the viz extra on the daemon",
    )
    rshow.add_argument(
        "--format", choices=("svg", "png", "dot"), default=None, help="picture format"
    )
    cancel = sub.add_parser("cancel", help="cancel a scheduled, queued or running job")
    cancel.add_argument("id")

    sub.add_parser("schedules", help="cron, interval and date schedules (config and dynamic)")
    sched = sub.add_parser("schedule", help="add or remove a dynamic schedule")
    ssub = sched.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    add = ssub.add_parser("add", help="add a schedule (kept across restarts)")
    add.add_argument("pipeline", help="pipeline name")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--cron",
        type=cron_arg,
        help="cron expression, e.g. '*/5 * * * *', or FlowerPower's '{\"minute\": \"*/5\"}'",
    )
    kind.add_argument(
        "--interval",
        type=interval_arg,
        help="interval, e.g. 30s, 5m, 1h, or FlowerPower's '{\"minutes\": 5}'",
    )
    kind.add_argument("--date", help="one-shot ISO 8601 time")
    add.add_argument("--id", default=None, help="schedule id (default: PIPELINE-<random>)")
    add.add_argument("--overwrite", action="store_true", help="replace a schedule with this id")
    add.add_argument("--timezone", default=None, help="IANA zone for cron and naive dates")
    add_run_options(add)
    rm = ssub.add_parser("rm", help="remove a dynamic schedule")
    rm.add_argument("id")

    for name, text in (
        ("pause", "pause a trigger or schedule"),
        ("resume", "resume a trigger or schedule"),
    ):
        cmd = sub.add_parser(name, help=text)
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("id", nargs="?", default=None)
        target.add_argument("--all", action="store_true")

    sub.add_parser("reload", help="re-read config and project; apply or keep the old (as SIGHUP)")
    sub.add_parser("events", help="stream run and trigger events until Ctrl-C")
    top = sub.add_parser(
        "top", help="live runs in flight, rates and latency per pipeline (q or Ctrl-C quits)"
    )
    top.add_argument(
        "--interval",
        "-d",
        type=parse_duration,
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    top.add_argument(
        "--iterations", "-n", type=int, default=None, metavar="N", help="stop after N refreshes"
    )
    stop = sub.add_parser("stop", help="graceful shutdown (as SIGTERM)")
    stop.add_argument(
        "--leave",
        action="store_true",
        help="for good: unsubscribe first (a shared subscription's other daemons get every"
        " new message), answer what the broker still sends, then end the MQTT session",
    )
    stop.add_argument(
        "--wait",
        action="store_true",
        help="return once the daemon has exited (bounded by --timeout when given)",
    )
    add_completion_command(sub)
    return p


def _with_run_options(out: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    """``out`` plus the run options given, as the protocol's ``run`` object (validated by the
    daemon like a trigger's ``run:``)."""
    overrides = run_overrides(args)
    return {**out, "run": overrides} if overrides else out


def _request(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """The protocol command and arguments for parsed command-line ``args``."""
    cmd = args.command
    if cmd == "run":
        out: dict[str, object] = {"pipeline": args.pipeline, "wait": args.wait}
        for key in ("inputs", "run_in", "run_at"):
            if getattr(args, key) is not None:
                out[key] = getattr(args, key)
        return "run", _with_run_options(out, args)
    if cmd == "jobs":
        return "jobs", {
            k: getattr(args, k)
            for k in ("pipeline", "state", "limit")
            if getattr(args, k) is not None
        }
    if cmd in ("job", "cancel"):
        return cmd, {"id": args.id}
    if cmd == "runs":
        return "runs_show", {"id": args.id}
    if cmd == "schedule":
        if args.schedule_command == "rm":
            return "schedule_rm", {"id": args.id}
        out = {"pipeline": args.pipeline, "overwrite": args.overwrite}
        for key in ("cron", "interval", "date", "id", "inputs", "timezone"):
            if getattr(args, key) is not None:
                out[key] = getattr(args, key)
        return "schedule_add", _with_run_options(out, args)
    if cmd == "status":
        return "status", {"fleet": True} if args.fleet else {}
    if cmd in ("pause", "resume"):
        return cmd, {"all": True} if args.all else {"id": args.id}
    if cmd == "stop":
        return "stop", {"leave": True} if args.leave else {}
    return cmd, {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowerpowerctl`` console script."""
    parser = _parser()
    complete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    if args.command == "completion":
        try:
            sys.stdout.write(hook("flowerpowerctl", args.shell))
        except CompletionUnavailable as exc:
            _err(f"error: {exc}")
            return EXIT_USAGE
        return EXIT_OK
    cmd, cmd_args = _request(args)
    path = args.socket or default_socket()
    until_gone = cmd == "stop" and args.wait
    long = cmd in ("events", "top") or (cmd == "run" and args.wait) or until_gone
    timeout = args.answer_timeout if args.answer_timeout is not None else (None if long else 30.0)
    dag = (args.dag, args.format) if cmd == "runs_show" and args.dag is not None else None
    try:
        if cmd == "top":
            return _top(path, args.interval, args.iterations)
        return anyio.run(_main, path, cmd, cmd_args, args.json, timeout, dag, until_gone)
    except KeyboardInterrupt:
        return EXIT_OK if cmd in ("events", "top") else 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _top(path: str, interval: float, iterations: int | None) -> int:
    from .top import run_top

    if interval <= 0:
        _err(f"error: flowerpowerctl top: --interval must be more than 0 s, not {interval:g}")
        return EXIT_USAGE
    if iterations is not None and iterations < 1:
        _err(f"error: flowerpowerctl top: --iterations must be 1 or more, not {iterations}")
        return EXIT_USAGE
    try:
        return anyio.run(
            functools.partial(
                run_top, ControlClient, path, interval=interval, iterations=iterations
            )
        )
    except UnreachableError as exc:
        _err(f"flowerpowerctl: {exc} (is the daemon running? --socket PATH)")
        return EXIT_UNREACHABLE


async def _main(
    path: str,
    cmd: str,
    args: dict[str, object],
    as_json: bool,
    limit_s: float | None,
    dag: tuple[str, str | None] | None = None,
    until_gone: bool = False,
) -> int:
    from . import render

    picture = None
    try:
        with anyio.fail_after(limit_s):
            async with ControlClient(path) as client:
                if cmd == "events":
                    async for event in client.stream("events"):
                        render.event(event, as_json)
                    return EXIT_OK
                if cmd == "runs_show":
                    from .runs import show_run

                    result, picture = await show_run(client, str(args["id"]), dag=dag is not None)
                    cmd = "job"
                else:
                    result = await client.call(cmd, args)
    except UnreachableError as exc:
        _err(f"flowerpowerctl: {exc} (is the daemon running? --socket PATH)")
        return EXIT_UNREACHABLE
    except CommandError as exc:
        if as_json:
            render.dump(
                {
                    "ok": False,
                    "error": {"code": exc.code, "message": exc.message, "details": exc.details},
                }
            )
        _err(f"error: {exc.code}: {exc.message}")
        if isinstance(exc.details, list):
            for problem in exc.details:
                _err(f"  - {render.problem(problem)}")
        return EXIT_ERROR
    except TimeoutError:
        _err(f"flowerpowerctl: no answer within {limit_s:g} s")
        return EXIT_UNREACHABLE
    if dag is not None and dag[0] == "-":
        # The picture owns stdout (`--dag - | dot -Tpng`): the run goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            code = render.result(cmd, args, result, as_json)
    else:
        code = render.result(cmd, args, result, as_json)
    if dag is not None and picture is not None:
        return await _draw(picture, *dag, quiet=as_json)
    if until_gone and code == EXIT_OK:
        try:
            with anyio.fail_after(limit_s):
                await _until_gone(path)
        except TimeoutError:
            _err(f"flowerpowerctl: the daemon is still running after {limit_s:g} s")
            return EXIT_ERROR
        if not as_json:
            sys.stdout.write("stopped\n")
    return code


async def _until_gone(path: str) -> None:
    """Until no daemon answers on ``path``: it has exited (and removed its socket)."""
    while True:
        try:
            async with ControlClient(path) as client:
                await client.call("ping", {})
        except UnreachableError:
            return
        await anyio.sleep(0.1)


async def _draw(picture: Mapping[str, object], output: str, fmt: str | None, quiet: bool) -> int:
    """Draw a ``dag`` answer's DOT text with this machine's ``dot`` (in a worker thread)."""
    from .draw import DrawError, picture_format, render_dot, write_picture

    try:
        kind = picture_format(output, fmt)
        data = await anyio.to_thread.run_sync(render_dot, str(picture.get("dot", "")), kind)
        write_picture(data, output)
    except DrawError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    if output != "-":
        names = picture.get("final_vars")
        what = ", ".join(map(str, names)) if isinstance(names, list) else ""
        line = f"wrote {output} (pipeline {picture.get('pipeline')}, path to {what or '-'})\n"
        (sys.stderr if quiet else sys.stdout).write(line)
    return EXIT_OK
