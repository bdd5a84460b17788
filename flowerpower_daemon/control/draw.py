"""DOT text to a picture file with Graphviz's ``dot`` program (standard library only).

Used where the picture is wanted: ``flowerpower-daemon pipeline visualize``
and ``flowerpowerctl runs show --dag`` (on the client's machine, so a daemon
under systemd needs no ``dot`` and its loop never waits for one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

__all__ = ["FORMATS", "DrawError", "picture_format", "render_dot", "write_picture"]

#: Picture formats: ``dot`` is the DOT text itself (no Graphviz program needed).
FORMATS = ("svg", "png", "dot")
#: How long one ``dot`` run may take (a big DAG takes well under a second).
DOT_TIMEOUT_S = 60.0


class DrawError(Exception):
    """The picture cannot be made (no ``dot`` program, it failed, or the file cannot be written)."""


def picture_format(output: str | None, given: str | None) -> str:
    """``given``, else the output file's suffix, else ``svg`` (no suffix, or stdout).

    A suffix that is no format here (``dag.pdf``) is a :class:`DrawError` rather
    than an SVG written under a name that promises something else.
    """
    if given:
        return given
    suffix = os.path.splitext(output or "")[1].lstrip(".").lower()
    if not suffix:
        return "svg"
    if suffix not in FORMATS:
        raise DrawError(
            f"cannot draw {output}: {suffix!r} is not a picture format here "
            f"(formats: {', '.join(FORMATS)}); name the file .svg, .png or .dot, or give --format"
        )
    return suffix


def render_dot(source: str, fmt: str) -> bytes:
    """The picture of DOT ``source`` in ``fmt`` (``svg``, ``png``; ``dot`` returns the text)."""
    if fmt == "dot":
        return source.encode()
    if fmt not in FORMATS:
        raise DrawError(f"unknown picture format {fmt!r} (formats: {', '.join(FORMATS)})")
    exe = shutil.which("dot")
    if exe is None:
        raise DrawError(
            f"drawing {fmt} needs Graphviz's dot program, not found on PATH: "
            "apt-get install graphviz (or --format dot writes the DOT text without it)"
        )
    try:
        proc = subprocess.run(
            [exe, f"-T{fmt}"],
            input=source.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DrawError(f"dot -T{fmt}: {exc}") from None
    if proc.returncode != 0 or not proc.stdout:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DrawError(f"dot -T{fmt} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def write_picture(data: bytes, output: str) -> None:
    """Write ``data`` to ``output`` (``-``: standard output)."""
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(output, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise DrawError(f"cannot write {output}: {exc.strerror or exc}") from None
