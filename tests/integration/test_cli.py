"""``flowerpower-daemon``'s project commands as a user types them, FlowerPower's forms included."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import orjson
import pytest
from daemon_harness import BIN, DAEMON, cli

from flowerpower_daemon.argtypes import parse_inputs
from flowerpower_daemon.cli import _parser
from flowerpower_daemon.control.client import default_socket, remember_socket

MODULE = '''
def values(count: int = 5) -> list[float]:
    """Some numbers."""
    return [float(i) for i in range(1, count + 1)]


def total(values: list[float], factor: float = 1.0) -> float:
    """The scaled sum."""
    return sum(values) * factor


def boom(total: float) -> float:
    """Fails on purpose."""
    raise ValueError(f"bad total {total}")
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    assert cli("init", "--base-dir", str(root)).returncode == 0
    assert cli("pipeline", "new", "calc", "--base-dir", str(root)).returncode == 0
    (root / "pipelines" / "calc.py").write_text(MODULE)
    (root / "conf" / "pipelines" / "calc.yml").write_text("run:\n  final_vars: [total]\n")
    return root


def run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("pipeline", "run", "calc", "--base-dir", str(project), "--format", "json", *args)


def test_inputs_as_key_value_pairs_and_flowerpower_option_names(project: Path) -> None:
    proc = run(
        project,
        "--inputs",
        "count=3,factor=2",
        "-o",
        "total,values",
        "--executor",
        "synchronous",
        "--log-level",
        "info",
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["outputs"] == {"total": 12.0, "values": [1.0, 2.0, 3.0]}
    proc = run(
        project,
        "--inputs",
        '{"count": 2}',
        "--executor",
        '{"type": "threadpool", "max_workers": 2}',
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["outputs"] == {"total": 3.0}


def test_bad_inputs_json_is_one_error_line_exit_2(project: Path) -> None:
    proc = run(project, "--inputs", '{"count": ')
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert lines[0].count("--inputs") == 1
    assert "usage:" not in proc.stderr


@pytest.mark.parametrize(
    "args", [("--max-retries", "-1"), ("--executor", "bogus"), ("--executor", '{"type": "x"}')]
)
def test_a_bad_override_exits_2(project: Path, args: tuple[str, ...]) -> None:
    proc = run(project, *args)
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr and "Traceback" not in proc.stderr
    assert "Value error, " not in proc.stderr


def test_every_run_option_has_a_help_line() -> None:
    parser = _parser()
    (pipeline,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    (sub,) = [
        a
        for a in pipeline.choices["pipeline"]._actions
        if isinstance(a, argparse._SubParsersAction)
    ]
    missing = [a.dest for a in sub.choices["run"]._actions if not a.help]
    assert missing == []
    text = cli("pipeline", "run", "--help").stdout
    assert "--outputs" in text and "--log-level" in text and "--traceback" in text


def test_traceback_flag_prints_the_failing_nodes_own_traceback(project: Path) -> None:
    proc = cli("pipeline", "run", "calc", "--base-dir", str(project), "-o", "boom", "--traceback")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[-1] == "error in node 'boom': ValueError: bad total 15.0"
    # The node's own frames, not Hamilton's.
    assert lines[0] == "Traceback (most recent call last):"
    assert f'File "{project / "pipelines" / "calc.py"}"' in lines[1]
    assert "hamilton" not in proc.stderr
    quiet = cli("pipeline", "run", "calc", "--base-dir", str(project), "-o", "boom")
    assert quiet.stderr.splitlines() == ["error in node 'boom': ValueError: bad total 15.0"]


def test_show_leads_with_the_dag_and_ends_quietly_in_a_pipe(project: Path) -> None:
    proc = cli("pipeline", "show", "calc", "--base-dir", str(project))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "inputs:     count: int, factor: float"
    assert lines[2] == "final vars: total"
    assert lines[3] == "nodes:"
    assert len(lines) < 20, proc.stdout  # only the non-default config keys
    full = cli("pipeline", "show", "calc", "--base-dir", str(project), "--full").stdout
    assert len(full.splitlines()) > len(lines)
    piped = subprocess.run(
        f"{DAEMON} pipeline show calc --full --base-dir {project} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stdout.startswith("pipeline calc")
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_init_without_name_initialises_this_directory_once(tmp_path: Path) -> None:
    here = tmp_path / "myproj"
    here.mkdir()
    first = cli("init", cwd=here)
    assert first.returncode == 0, first.stderr
    assert (here / "conf" / "project.yml").is_file()
    assert not (here / "myproj").exists()
    assert first.stdout.startswith(f"created project 'myproj' in {here}")
    second = cli("init", cwd=here)
    assert second.returncode == 0
    assert second.stdout.startswith(f"project already exists in {here}")
    named = cli("init", "--name", "sub", cwd=here)
    assert named.returncode == 0 and (here / "sub" / "conf" / "project.yml").is_file()


def test_check_names_the_config_file_for_semantic_problems(project: Path, tmp_path: Path) -> None:
    config = tmp_path / "daemon.yml"
    config.write_text(
        f"project: {project}\ntriggers:\n  - {{type: mqtt, pipeline: nope, topic: a/b}}\n"
    )
    proc = cli("check", "-c", str(config))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 1 configuration problem(s):"), proc.stderr
    assert f"{config}: triggers[0].pipeline: unknown pipeline 'nope'" in proc.stderr


def test_request_timeout_names_the_topic(tmp_path: Path) -> None:
    # Nothing listens on port 1 -> a connection error, one line, exit 2.
    proc = cli("request", "a/b", "--url", "mqtt://127.0.0.1:1", "--timeout", "5")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "mqtt://127.0.0.1:1" in proc.stderr
    assert "11883" in cli("request", "--help").stdout


def test_inputs_forms_match_flowerpower() -> None:
    assert parse_inputs('{"a": 1}') == {"a": 1}
    assert parse_inputs("{'a': 1}") == {"a": 1}
    assert parse_inputs("a=1, b=True,c=x y,d=null,e=2.5") == {
        "a": 1,
        "b": True,
        "c": "x y",
        "d": None,
        "e": 2.5,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_inputs("justtext")


def test_ctl_finds_the_socket_from_a_subdirectory_and_the_pointer(tmp_path: Path) -> None:
    sock = tmp_path / ".flowerpower" / "control.sock"
    sock.parent.mkdir()
    sock.touch()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert default_socket(env, cwd=str(deep)) == str(sock)
    elsewhere = tmp_path / "other"
    other_sock = elsewhere / "d.sock"
    elsewhere.mkdir()
    other_sock.touch()
    assert default_socket(env, cwd="/") != str(other_sock)
    remember_socket(str(other_sock), env)
    assert default_socket(env, cwd="/") == str(other_sock)


def test_ctl_run_options_become_request_args() -> None:
    """``flowerpowerctl run`` and ``schedule add`` send pipeline run's options as the ``run``
    object, by override name."""
    from flowerpower_daemon.control.client import _parser as ctl_parser
    from flowerpower_daemon.control.client import _request

    argv = "run p --inputs n=2 -o a,b --executor synchronous --max-workers 3 --log-level debug"
    argv += " --cache --max-retries 1 --retry-exceptions ValueError --with-adapter"
    run = ctl_parser().parse_args([*argv.split(), '{"progressbar": true}'])
    assert _request(run) == (
        "run",
        {
            "pipeline": "p",
            "wait": False,
            "inputs": {"n": 2},
            "run": {
                "final_vars": ["a", "b"],
                "cache": True,
                "with_adapter": {"progressbar": True},
                "max_retries": 1,
                "retry_exceptions": ["ValueError"],
                "executor": {"type": "local", "max_workers": 3},
                "log_level": "DEBUG",
            },
        },
    )
    cron = ctl_parser().parse_args(
        ["schedule", "add", "p", "--cron", '{"minute": "*/5", "hour": 3}', "--timeout", "9"]
    )
    assert _request(cron) == (
        "schedule_add",
        {"pipeline": "p", "overwrite": False, "cron": "0 */5 3 * * *", "run": {"timeout": 9.0}},
    )
    every = ctl_parser().parse_args(["schedule", "add", "p", "--interval", '{"minutes": 5}'])
    assert _request(every)[1]["interval"] == 300.0


@pytest.mark.parametrize(
    "args",
    [
        ("schedule", "add", "p", "--cron", '{"minutes": 5}'),
        ("schedule", "add", "p", "--interval", '{"minutes": "x"}'),
        ("run", "p", "--executor", '{"type": '),
        ("run", "p", "--inputs", "[1, 2]"),
    ],
)
def test_ctl_bad_option_is_one_error_line(args: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [str(BIN / "flowerpowerctl"), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_pydantic_value_error_prefix_never_reaches_a_problem() -> None:
    from flowerpower_daemon.errors import ConfigError, ConfigProblem

    problem = ConfigProblem("f.yml", "run.cache", "Value error, cache must be a mapping")
    assert str(problem) == "f.yml: run.cache: cache must be a mapping"
    assert "Value error" not in str(ConfigError([problem]))


MODAL = '''
from hamilton.function_modifiers import config


def mean(samples: list[float], scale: float = 1.0) -> float:
    """The scaled mean."""
    return sum(samples) / len(samples) * scale


@config.when(mode="fast")
def label__fast() -> str:
    """Fast."""
    return "fast"


@config.when(mode="slow")
def label__slow() -> str:
    """Slow."""
    return "slow"
'''


def test_show_lists_real_inputs_with_item_types_and_config_keys_apart(project: Path) -> None:
    """A ``@config.when`` key is no input; ``list[float]`` keeps its item type."""
    (project / "pipelines" / "modal.py").write_text(MODAL)
    (project / "conf" / "pipelines" / "modal.yml").write_text("run:\n  config: {mode: fast}\n")
    proc = cli("pipeline", "show", "modal", "--base-dir", str(project))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "inputs:     samples: list[float], scale: float"
    assert lines[2] == "config keys: mode"
    assert lines[3] == "final vars: label, mean"
    shown = orjson.loads(
        cli("pipeline", "show", "modal", "--base-dir", str(project), "--format", "json").stdout
    )
    roles = {n["name"]: (n["role"], n["type"]) for n in shown["nodes"]}
    assert roles["mode"][0] == "config" and roles["samples"] == ("input", "list[float]")
    plain = cli("pipeline", "show", "calc", "--base-dir", str(project)).stdout
    assert "config keys" not in plain


def test_list_warns_about_each_broken_pipeline(project: Path) -> None:
    (project / "pipelines" / "bad.py").write_text("def x() -> int:\n    return 1\n")
    (project / "conf" / "pipelines" / "bad.yml").write_text("run:\n  max_retries: many\n")
    (project / "conf" / "pipelines" / "orphan.yml").write_text("run: {}\n")
    proc = cli("pipeline", "list", "--base-dir", str(project))
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith("warning: pipeline 'bad' is broken, not listed: ")
    assert "bad.yml: run.max_retries" in warnings[0]
    assert warnings[1].startswith("warning: pipeline 'orphan' is broken, not listed: ")
    assert "no module pipelines/orphan.py" in warnings[1]
    assert "calc" in proc.stdout and "bad" not in proc.stdout


def test_inputs_given_twice_are_merged_in_order(project: Path) -> None:
    proc = run(project, "--inputs", "count=3,factor=5", "--inputs", '{"factor": 2}')
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["outputs"] == {"total": 12.0}  # (1+2+3) * 2
    from flowerpower_daemon.control.client import _parser as ctl_parser
    from flowerpower_daemon.control.client import _request

    args = ["run", "p", "--inputs", "a=1,b=1", "--inputs", "b=2", "--inputs", '{"c": 3}']
    assert _request(ctl_parser().parse_args(args))[1]["inputs"] == {"a": 1, "b": 2, "c": 3}
    add = ctl_parser().parse_args(
        ["schedule", "add", "p", "--cron", "* * * * *", "--inputs", "a=1", "--inputs", "b=2"]
    )
    assert _request(add)[1]["inputs"] == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("--max-retries", "-1"), "max_retries"),
        (("--with-adapter", '{"progresbar": true}'), "did you mean 'progressbar'"),
        (("--inputs", "nope=1"), "no node takes input 'nope'"),
    ],
)
def test_a_usage_error_prints_only_the_error(
    project: Path, args: tuple[str, ...], names: str
) -> None:
    """No "calc: failed in 0.0 ms" status line for a run that never started: exit 2."""
    proc = cli("pipeline", "run", "calc", "--base-dir", str(project), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and names in proc.stderr
    assert "failed in" not in proc.stderr


def test_unknown_executor_lists_every_accepted_type(project: Path) -> None:
    proc = run(project, "--executor", "bogus")
    assert proc.returncode == 2
    assert (
        "unknown executor type 'bogus'; use local (or synchronous), threadpool, processpool, "
        "ray, dask" in proc.stderr
    )
    assert run(project, "--executor", "synchronous").returncode == 0


def test_new_pipeline_errors_are_one_clear_line(project: Path) -> None:
    bad = cli("pipeline", "new", "1abc", "--base-dir", str(project))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "error: invalid pipeline name '1abc': a pipeline name is a Python identifier "
        "(letters, digits and _, not starting with a digit)"
    ]
    again = cli("pipeline", "new", "calc", "--base-dir", str(project))
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"error: pipeline 'calc' already exists ({project / 'pipelines' / 'calc.py'}); "
        "--overwrite replaces it"
    ]
    assert cli("pipeline", "new", "calc", "--overwrite", "--base-dir", str(project)).returncode == 0


def test_second_init_says_what_it_re_created_only_if_anything(tmp_path: Path) -> None:
    root = tmp_path / "p"
    assert cli("init", "--base-dir", str(root)).returncode == 0
    again = cli("init", "--base-dir", str(root))
    assert again.returncode == 0
    assert again.stdout == (
        f"project already exists in {root} ({root / 'conf' / 'project.yml'}): kept as it is\n"
    )
    (root / "hooks" / "__init__.py").unlink()
    (root / "hooks").rmdir()
    fixed = cli("init", "--base-dir", str(root))
    assert fixed.stdout.rstrip().endswith(
        "kept as it is; re-created what was missing: hooks/, hooks/__init__.py"
    )
    assert (root / "hooks" / "__init__.py").is_file()
