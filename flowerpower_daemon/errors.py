"""One shallow exception hierarchy.

Every error a user can cause derives from :class:`FlowerPowerError` and also
from the closest builtin, so callers may catch either. Messages name the file,
key, pipeline or topic involved; the CLI prints them without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DependencyMissingError",
    "FlowerPowerError",
    "InputError",
    "PipelineExistsError",
    "PipelineImportError",
    "PipelineNotFoundError",
    "RunTimeoutError",
    "clean_message",
]


class FlowerPowerError(Exception):
    """Root of every error raised on purpose by flowerpower-daemon."""


#: pydantic's prefixes of a validator's own message; the message alone is what a user needs.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def clean_message(message: str) -> str:
    """``message`` without pydantic's "Value error, " prefix (anywhere a line starts with it)."""
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix).replace(f"\n{prefix}", "\n")
        message = message.replace(f": {prefix}", ": ")
    return message


class ConfigProblem:
    """One problem found while validating a file: where it is and what is wrong."""

    __slots__ = ("file", "key", "message")

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = clean_message(message)

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self.file!r}, {self.key!r}, {self.message!r})"

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "key": self.key, "message": self.message}


class ConfigError(FlowerPowerError, ValueError):
    """A configuration file is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


class PipelineNotFoundError(FlowerPowerError, LookupError):
    """The named pipeline does not exist in the project."""

    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = sorted(available)
        known = ", ".join(self.available) or "none"
        super().__init__(f"unknown pipeline {name!r}; pipelines in this project: {known}")

    def __str__(self) -> str:
        return str(self.args[0])


class PipelineExistsError(FlowerPowerError, FileExistsError):
    """A pipeline with this name already exists."""


class PipelineImportError(FlowerPowerError, ImportError):
    """A pipeline module failed to import; the message names file and line."""


class InputError(FlowerPowerError, ValueError):
    """Inputs or final vars do not fit the pipeline's DAG; never retried."""


class DependencyMissingError(FlowerPowerError, ImportError):
    """An optional feature needs an extra that is not installed."""


class RunTimeoutError(FlowerPowerError, TimeoutError):
    """One attempt of a run took longer than its configured timeout."""
