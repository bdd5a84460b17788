"""How the config models read the keys FlowerPower writes: ``null``, older names, nested blocks.

FlowerPower writes ``null`` for "the default" and has renamed keys over its
versions (``tracker`` -> ``hamilton_tracker``, ``run.retry.*`` ->
``run.*``). The model bases here carry that mapping, so each model only
declares its own older names (:attr:`Frozen.older_keys`) and blocks
(:attr:`Frozen.key_blocks`), and the error messages of :mod:`.loading`
suggest them too. Also the helpers that place a validation error at a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "Frozen",
    "Section",
    "drop_nulls",
    "error_at",
    "moved",
    "nested_at",
    "valid_keys",
    "without_nulls",
]


class Frozen(BaseModel):
    """A frozen model that rejects unknown keys (a typo is an error naming the nearest key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Keys the model also takes under another name (FlowerPower's older or current spelling).
    older_keys: ClassVar[tuple[str, ...]] = ()
    #: Keys that are a block of other keys of the model (``run.retry``), with that block's model.
    key_blocks: ClassVar[Mapping[str, type[BaseModel]]] = {}


def valid_keys(owner: type[BaseModel]) -> list[str]:
    """Every key ``owner`` accepts: its fields, older names and blocks."""
    if not issubclass(owner, Frozen):
        return list(owner.model_fields)
    return [*owner.model_fields, *owner.older_keys, *owner.key_blocks]


def drop_nulls(data: Mapping[str, object], model: type[BaseModel]) -> dict[str, object]:
    """``data`` without the ``null`` values of ``model``'s keys (FlowerPower's "default").

    An unknown key stays, ``null`` or not, so that a typo is still reported.
    """
    known = set(valid_keys(model))
    return {k: v for k, v in data.items() if v is not None or k not in known}


def without_nulls(value: object, model: type[BaseModel]) -> object:
    """:func:`drop_nulls` for a mapping; any other value as it is (the model reports it)."""
    return drop_nulls(value, model) if isinstance(value, Mapping) else value


class Section(Frozen):
    """A block whose ``null`` values mean the default, as in the files FlowerPower writes."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, value: object) -> object:
        return without_nulls(value, cls)


def moved(value: object, old: str, new: str) -> object:
    """``value`` with key ``old`` (an older FlowerPower name) moved to ``new``.

    When both are blocks, the keys under ``new`` win over those under ``old``.
    """
    if isinstance(value, Mapping) and old in value:
        data = dict(value)
        was = data.pop(old)
        if isinstance(was, Mapping) and isinstance(data.get(new), Mapping):
            was = {**was, **data[new]}
        data.setdefault(new, was)
        return data
    return value


def error_at(title: str, key: str, value: object, message: str) -> ValidationError:
    """A validation error located at ``key`` (raised by a model's before-validator)."""
    kind = PydanticCustomError("value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data(
        title, [InitErrorDetails(type=kind, loc=(key,), input=value)]
    )


def nested_at(key: str, exc: ValidationError) -> ValidationError:
    """``exc`` with every error's location moved under ``key``."""
    details: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        detail = InitErrorDetails(type=err["type"], loc=(key, *err["loc"]), input=err["input"])
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        details.append(detail)
    return ValidationError.from_exception_data(exc.title, details)
