"""``flowerpower-daemon``: project commands (init, pipeline ...) and the daemon (run, check).

Errors a user makes are printed as ``error: ...`` on stderr with exit code 2,
never as a traceback; a failed pipeline run exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import __version__
from .argtypes import json_arg
from .errors import FlowerPowerError

__all__ = ["main"]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(FlowerPowerError, ValueError):
    """A command-line argument is malformed."""


_json_arg = json_arg


def _cache_arg(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return _json_arg("--cache", (dict, bool))(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowerpower-daemon",
        description="Run FlowerPower (Hamilton) pipelines and the daemon that triggers them.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--log-level", default=None, help="log level (default WARNING; daemon: from config)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--base-dir", default=".", help="project directory or fsspec URL (default .)")
    base.add_argument(
        "--storage-options",
        type=_json_arg("--storage-options", dict),
        default=None,
        help="fsspec storage options as JSON",
    )

    init = sub.add_parser("init", help="create a project in BASE_DIR/NAME")
    init.add_argument("--name", default=None, help="project name (default: current directory's)")
    init.add_argument("--base-dir", default=".", help="parent directory (default .)")

    pipe = sub.add_parser("pipeline", help="manage and run pipelines")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True)
    new = psub.add_parser("new", parents=[base], help="create a pipeline from the template")
    new.add_argument("name")
    new.add_argument("--overwrite", action="store_true")
    lst = psub.add_parser("list", parents=[base], help="list pipelines")
    lst.add_argument("--format", choices=("table", "json"), default="table")
    show = psub.add_parser("show", parents=[base], help="show a pipeline's config and DAG")
    show.add_argument("name")
    show.add_argument("--format", choices=("table", "json"), default="table")
    delete = psub.add_parser("delete", parents=[base], help="delete a pipeline")
    delete.add_argument("name")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask")
    run = psub.add_parser("run", parents=[base], help="run a pipeline now, in this process")
    run.add_argument("name")
    run.add_argument("--inputs", type=_json_arg("--inputs", dict), default=None)
    run.add_argument("--final-vars", type=_json_arg("--final-vars", list), default=None)
    run.add_argument("--config", type=_json_arg("--config", dict), default=None)
    run.add_argument("--cache", nargs="?", const=True, type=_cache_arg, default=None)
    run.add_argument("--executor", default=None, help="local|threadpool|processpool|ray|dask")
    run.add_argument("--max-workers", type=int, default=None)
    run.add_argument("--with-adapter", type=_json_arg("--with-adapter", dict), default=None)
    run.add_argument("--max-retries", type=int, default=None)
    run.add_argument("--retry-delay", type=float, default=None)
    run.add_argument("--retry-backoff", type=float, default=None)
    run.add_argument("--jitter-factor", type=float, default=None)
    run.add_argument("--retry-exceptions", type=_json_arg("--retry-exceptions", list), default=None)
    run.add_argument("--timeout", type=float, default=None)
    run.add_argument("--pipeline-log-level", "--run-log-level", dest="run_log_level", default=None)
    run.add_argument("--format", choices=("table", "json"), default="table")

    req = sub.add_parser(
        "request", help="publish a JSON message to a topic and print the daemon's reply"
    )
    req.add_argument("topic")
    req.add_argument("payload", type=_json_arg("payload", dict), nargs="?", default={})
    req.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker URL")
    req.add_argument("--timeout", type=float, default=30.0)

    for name, text in (
        ("run", "run the daemon in the foreground"),
        ("check", "validate the daemon config and the project; list every problem"),
        ("worker", "run pipelines from the Redis queue (scale-out worker)"),
    ):
        d = sub.add_parser(name, help=text)
        d.add_argument("--config", "-c", default=None, help="daemon config YAML")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowerpower-daemon`` console script."""
    args = _parser().parse_args(argv)
    from .logs import configure_logging

    if args.command in ("run", "worker"):
        return _daemon_command(args)
    configure_logging(args.log_level or "WARNING")
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "check":
            return _daemon_command(args)
        if args.command == "request":
            return _request(args)
        return _pipeline(args)
    except FlowerPowerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _init(args: argparse.Namespace) -> int:
    from .project.registry import init_project

    files = init_project(args.name, args.base_dir)
    print(f"created project in {files.display('')}")
    print("next: flowerpower-daemon pipeline new NAME --base-dir " + files.base_dir)
    return EXIT_OK


def _pipeline(args: argparse.Namespace) -> int:
    from .project.api import FlowerPowerProject

    project = FlowerPowerProject.load(args.base_dir, storage_options=args.storage_options)
    cmd = args.pipeline_command
    if cmd == "new":
        project.new(args.name, overwrite=args.overwrite)
        print(f"created pipeline {args.name!r}:")
        print(f"  {project.files.display(project.files.module_rel(args.name))}")
        print(f"  {project.files.display(project.files.config_rel(args.name))}")
        return EXIT_OK
    if cmd == "list":
        return _list(project, args.format)
    if cmd == "show":
        info = project.show(args.name)
        if args.format == "json":
            sys.stdout.buffer.write(orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
        else:
            _print_show(info)
        return EXIT_OK
    if cmd == "delete":
        project.spec.pipeline(args.name)
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"refusing to delete {args.name!r} without --yes (no terminal)")
            answer = input(f"delete pipeline {args.name!r} (module and YAML)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("kept")
                return EXIT_OK
        for path in project.delete(args.name):
            print(f"removed {path}")
        return EXIT_OK
    return _run(project, args)


def _list(project: Any, fmt: str) -> int:
    rows = []
    for name, cfg in sorted(project.pipelines.items()):
        sched = cfg.schedule
        when = (
            sched.cron
            or (str(sched.interval) if sched.interval else None)
            or (sched.date.isoformat() if sched.date else "-")
        )
        rows.append(
            {
                "name": name,
                "final_vars": list(cfg.run.final_vars),
                "executor": cfg.run.executor.type,
                "schedule": when,
                "max_retries": cfg.run.max_retries,
            }
        )
    if fmt == "json":
        sys.stdout.buffer.write(orjson.dumps(rows) + b"\n")
    else:
        _table(rows, ("name", "schedule", "executor", "max_retries", "final_vars"))
    return EXIT_OK


def _run(project: Any, args: argparse.Namespace) -> int:
    from .project.encoding import encode_result

    executor: Any = None
    if args.executor or args.max_workers:
        executor = {"type": args.executor or "local"}
        if args.max_workers:
            executor["max_workers"] = args.max_workers
    request = project.request(
        args.name,
        args.inputs,
        final_vars=args.final_vars,
        config=args.config,
        cache=args.cache,
        executor=executor,
        with_adapter=args.with_adapter,
        max_retries=args.max_retries,
        retry_delay=args.retry_delay,
        retry_backoff=args.retry_backoff,
        jitter_factor=args.jitter_factor,
        retry_exceptions=args.retry_exceptions,
        timeout=args.timeout,
        log_level=args.run_log_level.upper() if args.run_log_level else None,
    )
    result = project.execute(request)
    if args.format == "json":
        sys.stdout.buffer.write(encode_result(result) + b"\n")
    else:
        status = "ok" if result.ok else result.status
        print(
            f"{result.pipeline}: {status} in {result.duration_ms:.1f} ms "
            f"({len(result.attempts)} attempt(s)), run {result.run_id}"
        )
        if result.ok:
            _table(
                [{"output": k, "value": _short(v)} for k, v in result.outputs.items()],
                ("output", "value"),
            )
    if not result.ok and result.error is not None:
        where = f" in node {result.error.node!r}" if result.error.node else ""
        print(f"error{where}: {result.error.type}: {result.error.message}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_RUN_FAILED


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _print_show(info: dict[str, Any]) -> None:
    print(f"pipeline {info['name']}  ({info['module']})")
    print(f"async: {info['async']}   final vars: {', '.join(info['final_vars'])}")
    print("config:")
    sys.stdout.write(
        "".join(
            f"  {line}\n"
            for line in orjson.dumps(info["config"], option=orjson.OPT_INDENT_2)
            .decode()
            .splitlines()
        )
    )
    print("nodes:")
    _table(info["nodes"], ("name", "role", "type", "depends_on", "doc"))


def _request(args: argparse.Namespace) -> int:
    import anyio

    from .mqtt.link import request_reply

    try:

        async def ask() -> bytes:
            with anyio.fail_after(args.timeout):
                return await request_reply(args.url, args.topic, args.payload)

        reply = anyio.run(ask)
    except TimeoutError:
        print(f"error: no reply within {args.timeout:g} s", file=sys.stderr)
        return EXIT_RUN_FAILED
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(orjson.dumps(orjson.loads(reply), option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK if orjson.loads(reply).get("status") == "success" else EXIT_RUN_FAILED


def _daemon_command(args: argparse.Namespace) -> int:
    from .service.main import main as daemon_main

    return daemon_main(args.command, args.config, args.log_level)
