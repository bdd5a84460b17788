"""``flowerpower-daemon``: project commands (init, pipeline ...) and the daemon (run, check).

Errors a user makes are printed as ``error: ...`` on stderr with exit code 2,
never as a traceback; a failed pipeline run exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import __version__
from .argtypes import Parser, add_run_options, json_arg, names_arg, run_overrides
from .control.completion import (
    CompletionUnavailable,
    add_completion_command,
    complete,
    hook,
    pipeline_names,
)
from .errors import ConfigError, ConfigProblem, FlowerPowerError, clean_message
from .redact import redact_url

__all__ = ["main"]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(FlowerPowerError, ValueError):
    """A command-line argument is malformed."""


_json_arg = json_arg


def _listen_arg(text: str) -> tuple[str, int]:
    """``--http HOST:PORT`` (argparse type)."""
    from .settings.http import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: ``request``'s default broker: the embedded one of the quick start (config.example.yml).
DEFAULT_REQUEST_URL = "mqtt://127.0.0.1:11883"


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="flowerpower-daemon",
        description="Run FlowerPower (Hamilton) pipelines and the daemon that triggers them.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--log-level", default=None, help="log level (default WARNING; daemon: from config)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    base = Parser(add_help=False)
    base.add_argument("--base-dir", default=".", help="project directory or fsspec URL (default .)")
    base.add_argument(
        "--storage-options",
        type=_json_arg("--storage-options", dict),
        default=None,
        help="fsspec storage options as JSON",
    )

    init = sub.add_parser(
        "init", help="create a project in BASE_DIR (default: this directory), or BASE_DIR/NAME"
    )
    init.add_argument(
        "--name", "-n", default=None, help="create BASE_DIR/NAME (default: BASE_DIR itself)"
    )
    init.add_argument("--base-dir", "-d", default=".", help="project directory (default .)")
    init.add_argument(
        "--storage-options",
        "-s",
        type=_json_arg("--storage-options", dict),
        default=None,
        help="fsspec storage options as JSON",
    )

    pipe = sub.add_parser("pipeline", help="manage and run pipelines")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True)
    new = psub.add_parser("new", parents=[base], help="create a pipeline from the template")
    new.add_argument("name", help="pipeline name (a Python identifier)")
    new.add_argument("--overwrite", action="store_true", help="replace an existing pipeline")
    lst = psub.add_parser("list", parents=[base], help="list pipelines")
    lst.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    show = psub.add_parser(
        "show", parents=[base], help="show a pipeline's DAG (inputs, outputs, nodes) and config"
    )
    show.add_argument("name", help="pipeline name").completer = pipeline_names  # type: ignore[attr-defined]
    show.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    show.add_argument(
        "--full", action="store_true", help="show every config key, not only the non-default ones"
    )
    delete = psub.add_parser("delete", parents=[base], help="delete a pipeline")
    delete.add_argument("name", help="pipeline name").completer = pipeline_names  # type: ignore[attr-defined]
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask")
    run = psub.add_parser("run", parents=[base], help="run a pipeline now, in this process")
    run.add_argument("name", help="pipeline name").completer = pipeline_names  # type: ignore[attr-defined]
    add_run_options(run)
    run.add_argument("--traceback", action="store_true", help="print the failing node's traceback")
    run.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no per-node progress bar (shown on a terminal when tqdm is installed)",
    )

    viz = psub.add_parser(
        "visualize",
        parents=[base],
        help="draw a pipeline's DAG (SVG, PNG or DOT) with Graphviz (extra: viz)",
    )
    viz.add_argument("name", help="pipeline name").completer = pipeline_names  # type: ignore[attr-defined]
    viz.add_argument(
        "--format",
        choices=("svg", "png", "dot"),
        default=None,
        help="picture format (default: from --output's suffix, else svg)",
    )
    viz.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="where to write it; - for stdout (default NAME.FORMAT here)",
    )
    viz.add_argument(
        "--config", type=_json_arg("--config", dict), default=None, help="Hamilton config, JSON"
    )
    viz.add_argument(
        "--final-vars",
        type=names_arg,
        default=None,
        help="draw only the path to these outputs: a JSON array or a,b,c (default: every node)",
    )

    req = sub.add_parser(
        "request", help="publish a JSON message to a topic and print the daemon's reply"
    )
    req.add_argument("topic", help="MQTT topic a trigger subscribes to")
    req.add_argument(
        "payload",
        type=_json_arg("payload", dict),
        nargs="?",
        default={},
        help="JSON object (default {})",
    )
    req.add_argument(
        "--url",
        default=DEFAULT_REQUEST_URL,
        help=f"broker URL (default {DEFAULT_REQUEST_URL}: the quick start's embedded broker)",
    )
    req.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")

    for name, text in (
        ("run", "run the daemon in the foreground"),
        ("check", "validate the daemon config and the project; list every problem"),
        ("worker", "run pipelines from the Redis queue (scale-out worker)"),
    ):
        d = sub.add_parser(name, help=text)
        d.add_argument("--config", "-c", default=None, help="daemon config YAML")
        if name == "worker":
            d.add_argument(
                "--processes",
                "-p",
                type=int,
                default=1,
                metavar="N",
                help="run N worker processes under one supervising parent (default 1)",
            )
            d.add_argument(
                "--http",
                type=_listen_arg,
                default=None,
                metavar="HOST:PORT",
                help="serve /metrics, /healthz and /readyz there (e.g. 127.0.0.1:9465; "
                "needs the metrics extra)",
            )
    add_completion_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowerpower-daemon`` console script."""
    parser = _parser()
    complete(parser)
    args = parser.parse_args(argv)
    from .logs import configure_logging

    if args.command in ("run", "worker"):
        return _daemon_command(args)
    configure_logging(args.log_level or "WARNING", cli=True)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "check":
            return _check(args.config, args.log_level)
        if args.command == "request":
            return _request(args)
        if args.command == "completion":
            try:
                sys.stdout.write(hook("flowerpower-daemon", args.shell))
            except CompletionUnavailable as exc:
                raise UsageError(str(exc)) from None
            return EXIT_OK
        return _pipeline(args)
    except FlowerPowerError as exc:
        print(f"error: {redact_url(clean_message(str(exc)))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    """Scaffold BASE_DIR itself (as FlowerPower's ``init`` does), or BASE_DIR/NAME (``--name``)."""
    from .project.registry import PROJECT_YML, ProjectFiles, init_project, missing_scaffold

    base = args.base_dir.rstrip("/") or "/"
    if args.name is not None:
        parent, name = base, args.name
    elif "://" in base:
        parent, _, name = base.rpartition("/")
    else:
        target = os.path.abspath(base)
        parent, name = os.path.dirname(target), os.path.basename(target)
    existing = ProjectFiles(f"{parent.rstrip('/')}/{name}", args.storage_options)
    if existing.exists(PROJECT_YML):
        missing = missing_scaffold(existing)
        if missing:
            init_project(name, parent, args.storage_options)  # adds only what is missing
        added = f"; re-created what was missing: {', '.join(missing)}" if missing else ""
        print(
            f"project already exists in {existing.display('')} "
            f"({existing.display(PROJECT_YML)}): kept as it is{added}"
        )
        return EXIT_OK
    files = init_project(name, parent, args.storage_options)
    print(f"created project {name!r} in {files.display('')}")
    hint = "" if files.base_dir in (".", os.getcwd()) else f" --base-dir {files.base_dir}"
    print(f"next: flowerpower-daemon pipeline new NAME{hint}")
    return EXIT_OK


def _pipeline(args: argparse.Namespace) -> int:
    from .project.api import FlowerPowerProject

    project = FlowerPowerProject.load(args.base_dir, storage_options=args.storage_options)
    cmd = args.pipeline_command
    if cmd == "new":
        from .project.registry import existing_pipeline_file, validate_pipeline_name

        validate_pipeline_name(args.name)
        existing = None if args.overwrite else existing_pipeline_file(project.files, args.name)
        if existing is not None:
            raise UsageError(
                f"pipeline {args.name!r} already exists ({existing}); --overwrite replaces it"
            )
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
            _print_show(info, full=args.full)
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
    if cmd == "visualize":
        return _visualize(project, args)
    return _run(project, args)


def _visualize(project: Any, args: argparse.Namespace) -> int:
    """``pipeline visualize``: Hamilton draws the DAG as DOT, ``dot`` makes the picture."""
    from .control.draw import DrawError, picture_format, render_dot, write_picture
    from .project.visualize import dag_dot

    try:
        fmt = picture_format(args.output, args.format)
    except DrawError as exc:
        raise UsageError(str(exc)) from None
    output = args.output or f"{args.name}.{fmt}"
    picture = dag_dot(project.runner, args.name, config=args.config, final_vars=args.final_vars)
    try:
        write_picture(render_dot(picture.dot, fmt), output)
    except DrawError as exc:
        raise UsageError(str(exc)) from None
    if output != "-":
        what = f"path to {', '.join(picture.final_vars)}" if picture.final_vars else "every node"
        print(f"wrote {output} (pipeline {args.name}, {what})")
    return EXIT_OK


def _list(project: Any, fmt: str) -> int:
    """The valid pipelines (table or JSON); a ``warning:`` line per broken one on stderr."""
    for name, problems in sorted(project.spec.broken.items()):
        detail = "; ".join(redact_url(str(p)) for p in problems)
        print(f"warning: pipeline {name!r} is broken, not listed: {detail}", file=sys.stderr)
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

    overrides = run_overrides(args)
    if _progress_wanted(args):
        # Hamilton's tqdm adapter, unless --with-adapter says otherwise about it.
        given = overrides.get("with_adapter")
        overrides["with_adapter"] = {
            "progressbar": True,
            **(given if isinstance(given, dict) else {}),
        }
    show_trace = args.traceback or overrides.get("log_level") == "DEBUG"
    request = project.request(args.name, args.inputs, traceback=show_trace, **overrides)
    result = project.execute(request)
    error = result.error
    usage_error = error is not None and error.type in _USAGE_ERRORS
    if args.format == "json":
        sys.stdout.buffer.write(encode_result(result) + b"\n")
    elif not usage_error:  # a bad option or input never ran: its error line says it all
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
    if result.ok or error is None:
        return EXIT_OK if result.ok else EXIT_RUN_FAILED
    if show_trace and not usage_error:
        trace = error.traceback or "(no traceback was recorded for this run)\n"
        sys.stderr.write(trace if trace.endswith("\n") else trace + "\n")
    where = f" in node {error.node!r}" if error.node else ""
    print(f"error{where}: {error.type}: {clean_message(error.message)}", file=sys.stderr)
    # A bad override or input is the user's mistake, as the README says: exit 2.
    return EXIT_USAGE if usage_error else EXIT_RUN_FAILED


def _progress_wanted(args: argparse.Namespace) -> bool:
    """A progress bar for ``pipeline run``: on a terminal (stdout and stderr), in table
    format, when tqdm (extra ``progressbar``) is installed; never in a pipe or a script."""
    if args.no_progress or args.format != "table":
        return False
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return False
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None


#: Error types of a run that mean a bad command line, not a failing pipeline.
_USAGE_ERRORS = frozenset({"ConfigError", "InputError", "UsageError"})


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: list[dict[str, Any]], columns: Sequence[str], indent: str = "") -> None:
    from .control.render import text_table

    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    sys.stdout.write(text_table(cells, columns, indent))


def _non_default(value: Any, default: Any) -> Any:
    """The parts of a dumped config that differ from the defaults (``None`` when none do)."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {}
        for key, item in value.items():
            diff = _non_default(item, default.get(key)) if key in default else item
            if diff is not None:
                out[key] = diff
        return out or None
    return None if value == default else value


def _print_show(info: dict[str, Any], *, full: bool = False) -> None:
    """The DAG first (inputs, outputs, nodes), then the config keys that are not defaults."""
    from .project.config import PipelineConfig

    nodes = info["nodes"]
    inputs = [n for n in nodes if n["role"] == "input"]
    config_keys = [n["name"] for n in nodes if n["role"] == "config"]
    print(f"pipeline {info['name']}  ({info['module']}){'  async' if info['async'] else ''}")
    print("inputs:     " + (", ".join(f"{n['name']}: {n['type']}" for n in inputs) or "none"))
    if config_keys:
        print("config keys: " + ", ".join(config_keys))
    print("final vars: " + (", ".join(info["final_vars"]) or "none"))
    print("nodes:")
    _table(
        [n for n in nodes if n["role"] not in ("input", "config")],
        ("name", "role", "type", "depends_on", "doc"),
        indent="  ",
    )
    config = info["config"]
    if not full:
        defaults = PipelineConfig().model_dump(mode="json", exclude={"name"})
        config = _non_default(config, defaults) or {}
    label = "config:" if full else "config (non-default keys; --full for all):"
    print(label if config else "config: all defaults (--full to list them)")
    if config:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        sys.stdout.write("".join(f"  {line}\n" for line in text.splitlines()))


def _request(args: argparse.Namespace) -> int:
    import anyio

    from .mqtt.client import new_reply_topic, request_reply

    reply_to = new_reply_topic()
    try:

        async def ask() -> bytes:
            with anyio.fail_after(args.timeout):
                return await request_reply(args.url, args.topic, args.payload, reply_to=reply_to)

        reply = anyio.run(ask)
    except TimeoutError:
        print(
            f"error: published to {args.topic!r} on {redact_url(args.url)}, no reply within "
            f"{args.timeout:g} s on its reply_to topic {reply_to!r}: "
            "maybe no trigger matches this topic (flowerpowerctl triggers lists them)",
            file=sys.stderr,
        )
        return EXIT_RUN_FAILED
    except Exception as exc:
        print(f"error: {redact_url(args.url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(orjson.dumps(orjson.loads(reply), option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK if orjson.loads(reply).get("status") == "success" else EXIT_RUN_FAILED


def _check(config: str | None, log_level: str | None) -> int:
    """``check``: every problem as ``error:`` lines naming the file and key, exit 2;
    problems of pipelines no trigger runs as ``warning:`` lines (they stop nothing).

    Settings that do not validate are listed together with the project's problems
    (see :func:`~.service.check.check_without_settings`), so one run shows all."""
    from .logs import configure_logging
    from .service.check import check_report, check_without_settings, shown_as
    from .settings import Settings, load_settings

    settings: Settings | None = None
    problems: list[ConfigProblem] = []
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        problems = list(exc.problems)
        configure_logging(log_level or "INFO", cli=True)
        report = check_without_settings(config)
    else:
        configure_logging(log_level or settings.log_level, settings.log_format, cli=True)
        report = check_report(settings)
    for p in report.warnings:
        print(f"warning: {redact_url(str(p))} (no trigger runs this pipeline)", file=sys.stderr)
    for p in shown_as(report.config_warnings, config):
        print(f"warning: {redact_url(str(p))}", file=sys.stderr)
    problems += shown_as(report.errors, config)
    if problems:
        print(f"error: {redact_url(str(ConfigError(problems)))}", file=sys.stderr)
        return EXIT_USAGE
    assert settings is not None  # no problem: the settings loaded
    print(f"ok: {len(settings.triggers)} trigger(s), project {settings.project}")
    return EXIT_OK


def _daemon_command(args: argparse.Namespace) -> int:
    from .service.main import main as daemon_main

    http = args.http if args.command == "worker" else None
    if args.command == "worker" and args.processes != 1:
        if args.processes < 1:
            print("error: --processes: N must be 1 or more", file=sys.stderr)
            return EXIT_USAGE
        if http is not None:
            print("error: --http: one worker process only (not with --processes)", file=sys.stderr)
            return EXIT_USAGE
        from .service.supervisor import supervise

        return supervise(args.config, args.log_level, args.processes)

    return daemon_main(args.command, args.config, args.log_level, http)
