"""``flowerpower-daemon pipeline visualize``: real Graphviz draws the example's DAG."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_harness import CTL, ctl, ready_daemon
from daemon_harness import BIN, EXAMPLE, REPO, configure
from services import MosquittoService, require_binary

DAEMON = str(BIN / "flowerpower-daemon")
SVG = "{http://www.w3.org/2000/svg}svg"
STATS_NODES = ("count", "mean", "minimum", "maximum", "alert")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "sensors"
    shutil.copytree(EXAMPLE, root)
    return root


def viz(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAEMON, "pipeline", "visualize", *args, "--base-dir", str(project)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project,
        stdin=subprocess.DEVNULL,
        env={"HAMILTON_TELEMETRY_ENABLED": "false", "PATH": "/usr/bin:/bin", **(env or {})},
    )


def svg_text(path: Path) -> str:
    root = ET.parse(path).getroot()
    assert root.tag == SVG
    return " ".join(t.strip() for t in root.itertext() if t.strip())


def test_svg_png_and_dot_of_every_node(project: Path) -> None:
    require_binary("dot", "graphviz")
    proc = viz(project, "stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wrote stats.svg (pipeline stats, every node)"
    text = svg_text(project / "stats.svg")
    for name in (*STATS_NODES, "readings", "threshold"):
        assert name in text

    png = project / "dag.png"
    proc = viz(project, "stats", "--output", str(png))  # format from the suffix
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    proc = viz(project, "stats", "--format", "dot", "--output", "-")
    assert proc.returncode == 0, proc.stderr
    assert "\ndigraph {\n" in proc.stdout
    assert "count -> mean" in proc.stdout and "maximum -> alert" in proc.stdout


def test_final_vars_draw_only_their_path(project: Path) -> None:
    proc = viz(project, "stats", "--final-vars", "mean", "--format", "dot", "--output", "-")
    assert proc.returncode == 0, proc.stderr
    dot = proc.stdout
    assert "count -> mean" in dot
    assert "alert" not in dot and "maximum" not in dot
    assert '"#FFC857"' in dot  # the requested output is drawn as one

    proc = viz(project, "stats", "--final-vars", "mean,nope", "--format", "dot")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: pipeline 'stats' has no node(s) 'nope' "
        "(nodes: alert, count, maximum, mean, minimum, readings, threshold)"
    ]


def test_config_picks_the_functions_drawn(project: Path) -> None:
    (project / "pipelines" / "modal.py").write_text(
        "from hamilton.function_modifiers import config\n\n\n"
        '@config.when(mode="loud")\n'
        "def greeting__loud(name: str, volume: int) -> str:\n"
        "    return name.upper() * volume\n\n\n"
        '@config.when_not(mode="loud")\n'
        "def greeting__quiet(name: str) -> str:\n"
        "    return name.lower()\n"
    )
    (project / "conf" / "pipelines" / "modal.yml").write_text("run:\n  final_vars: [greeting]\n")
    quiet = viz(project, "modal", "--format", "dot", "--output", "-")
    loud = viz(project, "modal", "--format", "dot", "--output", "-", "--config", '{"mode": "loud"}')
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "volume" in loud.stdout and "volume" not in quiet.stdout

    bad = viz(project, "modal", "--config", "{mode")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--config" in bad.stderr


def test_without_dot_a_one_line_error_and_dot_text_still_works(
    project: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "nobin"
    empty.mkdir()
    proc = viz(project, "stats", env={"PATH": str(empty)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: drawing svg needs Graphviz's dot program, not found on PATH: "
        "apt-get install graphviz (or --format dot writes the DOT text without it)"
    ]
    assert not (project / "stats.svg").exists()
    proc = viz(project, "stats", "--format", "dot", env={"PATH": str(empty)})
    assert proc.returncode == 0, proc.stderr
    assert "count -> mean" in (project / "stats.dot").read_text()


def test_without_the_viz_extra_a_one_line_error(project: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "graphviz"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('graphviz is not installed here')\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from flowerpower_daemon.cli import main; sys.exit(main())",
            "pipeline",
            "visualize",
            "stats",
            "--base-dir",
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HAMILTON_TELEMETRY_ENABLED": "false", "PYTHONPATH": str(shadow.parent)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: drawing pipeline 'stats' needs the graphviz Python package; "
        "install it with: pip install 'flowerpower-daemon[viz]'"
    ]


def test_unknown_pipeline_is_a_usage_error(project: Path) -> None:
    proc = viz(project, "nope")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr


def test_an_output_suffix_that_is_no_format_is_an_error_not_an_svg(
    project: Path, daemon_sock: Path, tmp_path: Path
) -> None:
    """``--output dag.pdf`` once wrote SVG into dag.pdf; now one ``error:`` line, no file."""
    proc = viz(project, "stats", "--output", "dag.pdf")
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        "error: cannot draw dag.pdf: 'pdf' is not a picture format here (formats: svg, png, "
        "dot); name the file .svg, .png or .dot, or give --format"
    ]
    assert not (project / "dag.pdf").exists()
    assert viz(project, "stats", "--output", "dag", "--format", "dot").returncode == 0
    assert (project / "dag").read_text().lstrip().startswith(("//", "digraph"))

    run_id = ctl_run(daemon_sock, "stats")
    proc = show(daemon_sock, run_id, "--dag", str(tmp_path / "run.pdf"))
    assert proc.returncode == 2 and "'pdf' is not a picture format" in proc.stderr
    assert not (tmp_path / "run.pdf").exists()


def test_the_readme_picture_is_the_example_dag() -> None:
    """docs/example-dag.svg is what `pipeline visualize stats` draws for examples/sensors."""
    text = svg_text(REPO / "docs" / "example-dag.svg")
    for name in (*STATS_NODES, "readings", "threshold"):
        assert name in text
    assert "docs/example-dag.svg" in (REPO / "README.md").read_text()


# ------------------------------------------------- flowerpowerctl runs show --dag


@pytest.fixture(scope="module")
def daemon_sock(
    mosquitto_session: MosquittoService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    config = configure(tmp_path_factory.mktemp("runs"), mosquitto_session.port, [])
    with ready_daemon(config) as run:
        yield config.sock
        assert run.proc.proc.poll() is None, run.proc.log()[-3000:]


def ctl_run(sock: Path, *args: str) -> str:
    """Run a pipeline through the daemon and wait; its run id."""
    res = ctl(sock, "run", *args, "--wait")
    assert isinstance(res.out, dict), res
    return str(res.out["run_id"])


def show(sock: Path, *args: str, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--socket", str(sock), "runs", "show", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": path},
    )


def test_runs_show_draws_the_path_a_run_computed(daemon_sock: Path, tmp_path: Path) -> None:
    require_binary("dot", "graphviz")
    run_id = ctl_run(daemon_sock, "stats")
    picture = tmp_path / "run.svg"
    proc = show(daemon_sock, run_id, "--dag", str(picture))
    assert proc.returncode == 0, proc.stderr
    assert f"run_id       {run_id}" in proc.stdout and "state        success" in proc.stdout
    assert proc.stdout.splitlines()[-1] == (
        f"wrote {picture} (pipeline stats, path to count, mean, minimum, maximum, alert)"
    )
    text = svg_text(picture)
    assert all(name in text for name in STATS_NODES)

    as_json = ctl(daemon_sock, "runs", "show", run_id)  # --json: the job answer, as `job`
    assert as_json.rc == 0 and as_json.out["run_id"] == run_id, as_json
    assert as_json.out["result"]["outputs"]["count"] == 4

    run_id = ctl_run(daemon_sock, "stats", "--outputs", "mean")
    proc = show(daemon_sock, run_id, "--dag", "-", "--format", "dot")
    assert proc.returncode == 0, proc.stderr
    assert "count -> mean" in proc.stdout and "alert" not in proc.stdout.split("digraph")[1]


def test_runs_show_dag_to_stdout_is_only_the_picture(daemon_sock: Path) -> None:
    """``--dag -`` writes the picture alone on stdout (the run goes to stderr), so it
    pipes into ``dot`` or a file as is."""
    require_binary("dot", "graphviz")
    run_id = ctl_run(daemon_sock, "stats", "--outputs", "mean")
    proc = show(daemon_sock, run_id, "--dag", "-", "--format", "dot")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith(("//", "digraph")), proc.stdout[:200]
    assert f"run_id       {run_id}" in proc.stderr
    drawn = subprocess.run(
        ["dot", "-Tsvg"], input=proc.stdout, capture_output=True, text=True, timeout=60
    )
    assert drawn.returncode == 0, drawn.stderr
    svg = show(daemon_sock, run_id, "--dag", "-")  # SVG by default
    assert svg.returncode == 0 and svg.stdout.startswith("<?xml"), svg.stdout[:200]


def test_runs_show_marks_the_node_a_failed_run_stopped_in(
    daemon_sock: Path, tmp_path: Path
) -> None:
    res = ctl(daemon_sock, "run", "broken", "--wait")
    assert res.rc == 4, res
    run_id = res.out["run_id"]
    dot = tmp_path / "failed.dot"
    proc = show(daemon_sock, run_id, "--dag", str(dot))
    assert proc.returncode == 0, proc.stderr
    last = [x for x in dot.read_text().splitlines() if x.strip().startswith("boom ")][-1]
    assert 'fillcolor="#F4A6A6"' in last and "color=red" in last  # the last word on its fill
    assert "failed" in dot.read_text()  # the legend entry


def test_runs_show_errors_are_one_line(daemon_sock: Path, tmp_path: Path) -> None:
    run_id = ctl_run(daemon_sock, "stats")
    empty = tmp_path / "nobin"
    empty.mkdir()
    proc = show(daemon_sock, run_id, "--dag", str(tmp_path / "x.svg"), path=str(empty))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: drawing svg needs Graphviz's dot program, not found on PATH: "
        "apt-get install graphviz (or --format dot writes the DOT text without it)"
    ]
    assert run_id in proc.stdout  # the run itself is still shown

    proc = show(daemon_sock, "no-such-run", "--dag", str(tmp_path / "y.svg"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: not_found: no job 'no-such-run' (active or in the history)"
    ]
