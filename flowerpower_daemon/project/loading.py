"""YAML text to validated config models, with problems that name file, key path and nearest key.

``${VAR}`` and ``${VAR:-default}`` in string values are taken from the
environment before validation. Pydantic's errors become
:class:`~flowerpower_daemon.errors.ConfigProblem` lines; an unknown key gets
the nearest valid one (``did you mean 'max_retries'?``), FlowerPower's older
names and blocks (:mod:`.fpkeys`) included.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from typing import TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigProblem
from .fpkeys import Frozen, valid_keys

__all__ = ["expand_env", "format_validation_error", "load_yaml_text", "validate_model"]

_M = TypeVar("_M", bound=BaseModel)

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: object, problems: list[str], path: tuple[str | int, ...] = ()) -> object:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of ``value``.

    Unset variables without a default are appended to ``problems`` as
    ``"key.path: message"`` strings and left in place.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is not None:
                return found
            if default is not None:
                return default
            problems.append(
                f"{_dotted(path)}: environment variable {name} is not set "
                f"(use ${{{name}:-default}})"
            )
            return match.group(0)

        return _ENV_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, problems, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, problems, (*path, i)) for i, v in enumerate(value)]
    return value


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml_text(text: str, file: str) -> tuple[dict[str, object], list[ConfigProblem]]:
    """Parse YAML text into a mapping with ``${VAR}`` expanded; problems are returned."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        return {}, [ConfigProblem(file, where, f"invalid YAML: {reason}")]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [ConfigProblem(file, "", f"expected a mapping, got {type(data).__name__}")]
    env_problems: list[str] = []
    expanded = {k: expand_env(v, env_problems, (k,)) for k, v in data.items()}
    problems = [ConfigProblem(file, *p.split(": ", 1)) for p in env_problems]
    return expanded, problems


def _candidates(annotation: object) -> list[type[BaseModel]]:
    """Model classes inside an annotation (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _candidates(arg)
    return out


def _annotation(model: type[BaseModel], name: str) -> object:
    info = model.model_fields.get(name)
    return info.annotation if info is not None else None


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (for nearest-key suggestions)."""
    current: type[BaseModel] = model
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, str) and issubclass(current, Frozen) and part in current.key_blocks:
            current = current.key_blocks[part]  # ``run.retry``: a block of RunConfig's keys
            continue
        if not isinstance(part, str) or part not in current.model_fields:
            return None
        found = _candidates(current.model_fields[part].annotation)
        if parts and isinstance(parts[0], int):
            parts.pop(0)
        if len(found) > 1 and parts and isinstance(parts[0], str):
            tag = parts[0]
            tagged = [c for c in found if tag in get_args(_annotation(c, "type"))]
            if tagged:
                parts.pop(0)
                found = tagged
        if len(found) != 1:
            return None
        current = found[0]
    return current


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], file: str
) -> Iterator[ConfigProblem]:
    """Turn pydantic's errors into problems naming file, key path and nearest key."""
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _dotted(loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            valid = valid_keys(owner) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = f" (valid keys: {', '.join(valid)})" if valid and not close else ""
            yield ConfigProblem(file, key, f"unknown key{hint}{listing}")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            yield ConfigProblem(file, key, msg)


def validate_model(
    model: type[_M], data: Mapping[str, object], file: str
) -> tuple[_M | None, list[ConfigProblem]]:
    """Validate ``data`` into ``model``; return the model or every problem found."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        return None, list(format_validation_error(exc, model, file))
