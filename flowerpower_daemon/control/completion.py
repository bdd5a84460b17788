"""Shell completion (bash, zsh, fish) for ``flowerpowerctl`` and ``flowerpower-daemon``.

argcomplete (the ``completion`` extra) completes from the argparse parsers
themselves, so every command, option and choice is offered as ``--help``
lists it. It is imported only when a shell asks for completions (the hook
sets ``_ARGCOMPLETE``) or when ``completion SHELL`` prints the hook: plain
commands and ``--help`` pay one environment lookup, nothing more.
"""

from __future__ import annotations

import argparse
import os
from typing import TypeVar

__all__ = [
    "SHELLS",
    "CompletionUnavailable",
    "add_completion_command",
    "complete",
    "hook",
    "pipeline_names",
]

SHELLS = ("bash", "zsh", "fish")
_P = TypeVar("_P", bound=argparse.ArgumentParser)
_EXTRA_HINT = "install it with: pip install 'flowerpower-daemon[completion]'"


class CompletionUnavailable(Exception):
    """argcomplete is not installed (the ``completion`` extra)."""


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell and exit, when the shell's completion hook runs us; else return."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        os._exit(1)  # the shell just gets no completions
    argcomplete.autocomplete(parser)


def hook(prog: str, shell: str) -> str:
    """The script that registers ``prog``'s completion in ``shell`` (source it)."""
    try:
        from argcomplete.shell_integration import shellcode
    except ImportError:
        raise CompletionUnavailable(f"shell completion needs argcomplete; {_EXTRA_HINT}") from None
    return shellcode([prog], shell=shell)


def pipeline_names(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """argcomplete completer: the pipelines of ``--base-dir`` (a local directory), by their
    ``conf/pipelines/*.yml`` (no project is loaded: a completion must answer at once)."""
    base = getattr(parsed_args, "base_dir", None) or "."
    try:
        files = os.listdir(os.path.join(base, "conf", "pipelines"))
    except OSError:
        return []
    names = (f.rsplit(".", 1)[0] for f in files if f.endswith((".yml", ".yaml")))
    return sorted(n for n in names if n.startswith(prefix))


def add_completion_command(sub: argparse._SubParsersAction[_P]) -> None:
    """The ``completion SHELL`` command: print the hook to load in ``~/.bashrc`` and co."""
    cmd = sub.add_parser(
        "completion",
        help="print the shell completion script to source (bash, zsh, fish; extra: completion)",
    )
    cmd.add_argument("shell", choices=SHELLS, help="the shell to complete in")
