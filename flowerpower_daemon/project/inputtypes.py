"""Deep checks of input values against a pipeline's parameter annotations.

Hamilton checks an input's outer type at most (``""`` or ``["x", 1]`` reach a
``samples: list[float]`` node, which then fails with a retryable error, or
worse, succeeds on the wrong data). :func:`compile_check` turns an
annotation into a function, built once per pipeline, that walks a value
and returns why it does not fit (``"got str"``, ``"item 0 is str"``) or
``None``. JSON integers are accepted for ``float`` (not booleans); what the
checker cannot reason about (type variables, ``TypedDict``, protocols...)
is accepted. Two choices beyond the annotation: a string is never taken for
a collection of items (``""`` for ``Sequence[float]``), and only lists,
tuples and sets have their items walked (an iterator is not consumed).
"""

from __future__ import annotations

import collections.abc as cabc
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["Check", "compile_check", "type_label"]

#: ``check(value)`` -> ``None`` when ``value`` fits, else why not ("got str").
Check = Callable[[object], "str | None"]

#: Collection annotations -> the classes a value may be. Only the concrete containers in
#: ``_WALKED`` have their items checked: an iterator or generator is not consumed.
_SEQUENCES: dict[object, tuple[type, ...]] = {
    list: (list,),
    set: (set,),
    frozenset: (frozenset,),
    cabc.Sequence: (cabc.Sequence,),
    cabc.MutableSequence: (cabc.MutableSequence,),
    cabc.Set: (cabc.Set,),
    cabc.MutableSet: (cabc.MutableSet,),
    cabc.Iterable: (cabc.Iterable,),
    cabc.Collection: (cabc.Collection,),
}
_WALKED = (list, tuple, set, frozenset)
#: Text is never taken for a collection of items (``""`` for ``Sequence[float]``).
_TEXT = (str, bytes, bytearray)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def type_label(tp: object) -> str:
    """``list[float]``, ``float``, ``Optional[int]``: an annotation as a user wrote it."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("collections.abc.", "")


def _got(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _accepts_none(tp: object) -> bool:
    if tp is Any or tp is object or tp is type(None) or tp is None:
        return True
    if isinstance(tp, typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _accepts_none(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts_none(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return None in typing.get_args(tp)
    return False


def compile_check(tp: object) -> Check | None:
    """The check for annotation ``tp``, or ``None`` when every value fits it."""
    inner = _compile(tp)
    label = type_label(tp)
    nullable = _accepts_none(tp)
    if inner is None:
        if nullable:
            return None
        return lambda value: f"is null, expected {label}" if value is None else None
    exact: frozenset[type] = getattr(inner, "exact", frozenset())

    def check(value: object) -> str | None:
        if type(value) in exact:
            return None
        if value is None:
            return None if nullable else f"is null, expected {label}"
        why = inner(value)
        if why is None:
            return None
        return f"has the wrong type: expected {label}, {why}"

    return check


def _compile(tp: object) -> Check | None:
    """Why a value does not fit ``tp`` (``None``: anything fits)."""
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar | str):
        return None
    if tp is float:
        return _Float()
    if tp is type(None) or tp is None:
        return _Instance(type(None))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is None:
        supertype = getattr(tp, "__supertype__", None)  # NewType
        if supertype is not None:
            return _compile(supertype)
        return _Instance(tp) if isinstance(tp, type) else None
    if origin is typing.Annotated:
        return _compile(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return _union(args)
    if origin is typing.Literal:
        return lambda v: None if v in args else f"got {v!r}"
    if origin is tuple:
        return _tuple(args)
    if origin in _SEQUENCES:
        return _items(_SEQUENCES[origin], _compile(args[0]) if args else None)
    if origin in _MAPPINGS:
        keys = _compile(args[0]) if args else None
        values = _compile(args[1]) if len(args) > 1 else None
        return _mapping(keys, values)
    return _Instance(origin) if isinstance(origin, type) else None


class _Float:
    """``float``: floats and ints (JSON has one number type), not booleans."""

    __slots__ = ()
    exact = frozenset((float, int))

    def __call__(self, value: object) -> str | None:
        if isinstance(value, int | float) and type(value) is not bool:
            return None
        return f"got {_got(value)}"


class _Instance:
    """A plain class: ``isinstance``; ``exact`` lets containers of it skip the per-item loop."""

    __slots__ = ("cls", "exact")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.exact = frozenset((cls,))

    def __call__(self, value: object) -> str | None:
        try:
            ok = isinstance(value, self.cls)
        except TypeError:  # TypedDict, non-runtime protocols: cannot tell
            return None
        return None if ok else f"got {_got(value)}"


def _union(args: tuple[object, ...]) -> Check | None:
    options = [_compile(a) for a in args]
    if any(o is None for o in options):
        return None
    checks = [o for o in options if o is not None]
    named = [c for a, c in zip(args, checks, strict=True) if a is not type(None)]

    def check(value: object) -> str | None:
        whys = [c(value) for c in checks]
        if any(w is None for w in whys):
            return None
        return named[0](value) if len(named) == 1 else f"got {_got(value)}"

    return check


def _items(kinds: tuple[type, ...], item: Check | None) -> Check:
    exact: frozenset[type] | None = getattr(item, "exact", None)

    def check(value: object) -> str | None:
        if not isinstance(value, kinds) or isinstance(value, _TEXT):
            return f"got {_got(value)}"
        if item is None or not isinstance(value, _WALKED):
            return None
        values = typing.cast(cabc.Iterable[object], value)
        # The set of item types, built in C, settles most lists without a Python loop.
        if exact is not None and {type(v) for v in values} <= exact:
            return None
        for i, v in enumerate(values):
            why = item(v)
            if why is not None:
                return f"item {i}{_sep(why)}"
        return None

    return check


def _sep(why: str) -> str:
    """What follows "item 0" in a container: " is str", or ": item 2 is str" deeper down."""
    return " is " + why[4:] if why.startswith("got ") else ": " + why


def _tuple(args: tuple[object, ...]) -> Check:
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        return _items((tuple, list), _compile(args[0]) if args else None)
    checks = [_compile(a) for a in args]

    def check(value: object) -> str | None:
        if not isinstance(value, tuple | list):
            return f"got {_got(value)}"
        if len(value) != len(checks):
            return f"got {len(value)} items, expected {len(checks)}"
        for i, (c, v) in enumerate(zip(checks, value, strict=True)):
            why = c(v) if c is not None else None
            if why is not None:
                return f"item {i}{_sep(why)}"
        return None

    return check


def _mapping(keys: Check | None, values: Check | None) -> Check:
    def check(value: object) -> str | None:
        if not isinstance(value, cabc.Mapping):
            return f"got {_got(value)}"
        if keys is None and values is None:
            return None
        for k, v in value.items():
            if keys is not None and (why := keys(k)) is not None:
                return f"key {k!r}{_sep(why)}"
            if values is not None and (why := values(v)) is not None:
                return f"value of {k!r}{_sep(why)}"
        return None

    return check
