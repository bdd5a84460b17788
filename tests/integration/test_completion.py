"""Shell completion: a real bash loads the hook and completes commands, options and choices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import BIN, EXAMPLE
from services import require_binary

ENV = {
    "PATH": f"{BIN}:/usr/bin:/bin",
    "HOME": os.environ.get("HOME", "/tmp"),
    "HAMILTON_TELEMETRY_ENABLED": "false",
}

#: Load the hook as a user's ~/.bashrc would, then call the registered function the way
#: bash does on <TAB>: COMP_WORDS/COMP_CWORD/COMP_LINE/COMP_POINT set, COMPREPLY read back.
BASH = r"""
eval "$("$PROG" completion bash)"
complete -p "$PROG"
fn=$(complete -p "$PROG" | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
read -r -a COMP_WORDS <<< "$LINE"
[[ "$LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$LINE"
COMP_POINT=${#COMP_LINE}
"$fn" "$PROG" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf 'reply:%s\n' "${COMPREPLY[@]}"
"""


def tab(prog: str, line: str, cwd: Path | None = None) -> tuple[str, list[str]]:
    """(``complete -p`` output, the completions bash would offer for ``line``)."""
    bash = require_binary("bash")
    proc = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", BASH],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "PROG": prog, "LINE": line},
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    replies = [x.removeprefix("reply:").strip() for x in lines if x.startswith("reply:")]
    return lines[0], [r for r in replies if r]


def test_bash_completes_flowerpowerctl_commands_and_choices() -> None:
    registered, replies = tab("flowerpowerctl", "flowerpowerctl sta")
    assert registered.startswith("complete ") and registered.endswith(" flowerpowerctl")
    assert " -F " in registered
    assert replies == ["status"]

    _, replies = tab("flowerpowerctl", "flowerpowerctl s")
    assert {"status", "schedules", "schedule", "stop"} <= set(replies)
    _, replies = tab("flowerpowerctl", "flowerpowerctl jobs --state ")
    assert set(replies) == {
        "scheduled",
        "queued",
        "running",
        "success",
        "failed",
        "cancelled",
        "timeout",
    }
    _, replies = tab("flowerpowerctl", "flowerpowerctl completion ")
    assert {"bash", "zsh", "fish"} <= set(replies)


def test_bash_completes_flowerpower_daemon() -> None:
    registered, replies = tab("flowerpower-daemon", "flowerpower-daemon pipeline vis")
    assert registered.endswith(" flowerpower-daemon")
    assert replies == ["visualize"]
    _, replies = tab("flowerpower-daemon", "flowerpower-daemon pipeline visualize x --format ")
    assert {"svg", "png", "dot"} <= set(replies) and "status" not in replies


def test_bash_completes_pipeline_names_of_the_project() -> None:
    """Pipeline names come from --base-dir's conf/pipelines (here, or the one given)."""
    _, replies = tab("flowerpower-daemon", "flowerpower-daemon pipeline run s", cwd=EXAMPLE)
    assert replies == ["stats"]
    line = f"flowerpower-daemon pipeline visualize --base-dir {EXAMPLE} "
    _, replies = tab("flowerpower-daemon", line)
    assert {"stats", "temperature"} <= set(replies)


@pytest.mark.parametrize("prog", ["flowerpowerctl", "flowerpower-daemon"])
def test_zsh_and_fish_hooks(prog: str) -> None:
    zsh = subprocess.run([str(BIN / prog), "completion", "zsh"], capture_output=True, text=True)
    assert zsh.returncode == 0 and zsh.stdout.startswith(f"#compdef {prog}\n"), zsh.stderr
    fish = subprocess.run([str(BIN / prog), "completion", "fish"], capture_output=True, text=True)
    assert fish.returncode == 0, fish.stderr
    assert f"complete --command {prog} " in fish.stdout


def test_without_the_extra_a_one_line_error(tmp_path: Path) -> None:
    shadow = tmp_path / "argcomplete"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('argcomplete is not installed here')\n")
    for module in ("flowerpower_daemon.control.client", "flowerpower_daemon.cli"):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from {module} import main; sys.exit(main())",
                "completion",
                "bash",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**ENV, "PYTHONPATH": str(tmp_path)},
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            "error: shell completion needs argcomplete; "
            "install it with: pip install 'flowerpower-daemon[completion]'"
        ]


def test_help_does_not_import_argcomplete() -> None:
    """Completion costs plain commands nothing: argcomplete loads only when a shell asks."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "from flowerpower_daemon.control.client import main; main(['--help'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "argcomplete" not in proc.stderr
