"""Log lines carry their syslog priority (``<3>`` ...) only when stderr is journald's stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

# A process that logs at every level, through structlog and through stdlib logging.
_SCRIPT = """
import logging, sys
import structlog
from flowerpower_daemon.logs import configure_logging

configure_logging("DEBUG", sys.argv[1])
log = structlog.get_logger("t")
log.debug("d")
log.info("i")
log.warning("w")
log.error("e")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("x")
logging.getLogger("third.party").warning("stdlib %s", "w")
"""


def _run(tmp_path: Path, fmt: str, *, journal: str | None) -> list[str]:
    """Run the script with stderr on a file; ``journal``: JOURNAL_STREAM's value, or the file's."""
    err = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err.open("w") as fh:
        st = os.fstat(fh.fileno())
        if journal is not None:
            env["JOURNAL_STREAM"] = journal or f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-c", _SCRIPT, fmt], stderr=fh, env=env, check=True, timeout=60
        )
    return err.read_text().splitlines()


def test_journald_stream_lines_start_with_their_priority(tmp_path: Path) -> None:
    """JSON lines on the journal's stream: <7> debug, <6> info, <4> warning, <3> error."""
    lines = _run(tmp_path, "json", journal="")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>", "<4>"]
    events = [orjson.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == ["d", "i", "w", "e", "x", "stdlib w"]
    assert "ValueError: boom" in events[4]["exception"]


def test_console_format_prefixes_every_line_of_a_traceback(tmp_path: Path) -> None:
    """Console output on the journal: a traceback's lines are all filed as errors."""
    lines = _run(tmp_path, "console", journal="")
    start = next(i for i, line in enumerate(lines) if " x" in line and "[error" in line)
    traceback = lines[start : start + 5]
    assert all(line.startswith("<3>") for line in traceback), traceback
    assert lines[0].startswith("<7>") and "[debug" in lines[0]


@pytest.mark.parametrize("journal", [None, "1:2", "not-a-pair"])
def test_no_prefix_unless_stderr_is_the_journal(tmp_path: Path, journal: str | None) -> None:
    """No JOURNAL_STREAM, or one naming another file (inherited, stderr redirected): plain."""
    lines = _run(tmp_path, "json", journal=journal)
    assert len(lines) == 6
    assert all(line.startswith("{") for line in lines), lines


_ERROR_SCRIPT = """
from flowerpower_daemon.logs import print_error

print_error("config.yml: bad\\n  - second line")
"""


@pytest.mark.parametrize(("journal", "prefix"), [("", "<3>"), (None, "")])
def test_print_error_is_filed_at_error_level_under_journald(
    tmp_path: Path, journal: str | None, prefix: str
) -> None:
    """The entry points' `error: ...` lines get <3> on the journal's stream (each line), else none."""
    err = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err.open("w") as fh:
        if journal is not None:
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", _ERROR_SCRIPT], stderr=fh, env=env, check=True)
    assert err.read_text().splitlines() == [
        f"{prefix}error: config.yml: bad",
        f"{prefix}  - second line",
    ]


_MESSAGE_SCRIPT = """
import sys
import structlog
from flowerpower_daemon.logs import configure_logging

configure_logging("INFO", "json", cli=sys.argv[1] == "cli")
log = structlog.get_logger("t")
log.warning("config_key_has_no_effect", message="a.yml: k: accepted, has no effect here: r", key="k")
log.info("note", message="an info event with a message stays a log line")
log.warning("plain_warning")
"""


@pytest.mark.parametrize("mode", ["cli", "daemon"])
def test_cli_prints_warnings_with_a_message_as_plain_lines(tmp_path: Path, mode: str) -> None:
    """CLI commands: a warning carrying a ``message`` is ``warning: <message>``; other events,
    and every event of the daemon, stay structured (JSON here)."""
    err = subprocess.run(
        [sys.executable, "-c", _MESSAGE_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stderr.splitlines()
    assert len(err) == 3, err
    if mode == "cli":
        assert err[0] == "warning: a.yml: k: accepted, has no effect here: r"
    else:
        assert orjson.loads(err[0])["event"] == "config_key_has_no_effect"
        assert orjson.loads(err[0])["key"] == "k"
    assert orjson.loads(err[1])["event"] == "note"
    assert orjson.loads(err[2])["event"] == "plain_warning"
