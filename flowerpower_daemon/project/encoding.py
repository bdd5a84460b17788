"""Pipeline outputs and result messages as JSON bytes (orjson, with documented forms).

Result messages (README, "Results") are encoded with orjson, about 20x
faster than the stdlib ``json``. Values that JSON cannot hold natively have
one documented form each, so a subscriber in any language can decode them:

=======================================  ===================================================
Python value                          JSON form
=======================================  ===================================================
``str``, ``int``, ``float``, ``bool``    as is; ``None`` -> ``null``
``float`` NaN / Infinity                 ``null`` (orjson's rule: JSON has no NaN)
``int`` beyond 64 bits                   decimal string, e.g. ``"18446744073709551616"``
``dict`` / any ``Mapping``               object; non-string keys become strings (``1`` ->
                                         ``"1"``, ``None`` -> ``"null"``, datetimes ISO,
                                         enums by value, any other key ``str(key)``)
``list``, ``tuple``, namedtuple,         array
``deque``
``set`` / ``frozenset``                  array (sorted when the items are comparable)
``datetime`` / ``date`` / ``time``       ISO 8601 string, e.g. ``"2024-05-01T12:00:00+00:00"``
                                         (naive values carry no offset)
``timedelta``                            total seconds as a number, e.g. ``90.5``
``bytes`` / ``bytearray``                ``{"__type__": "bytes", "base64": "..."}``
                                         (standard alphabet, padded)
``Decimal``                              string, e.g. ``"1.10"`` (no precision lost)
``UUID``                                 string, e.g. ``"5f0c3e1a-..."``
``pathlib.Path``                         string
``Enum``                                 the member's value
dataclass instance                       object of its fields
pydantic model                           ``model.model_dump(mode="json")``
numpy array                              nested arrays; ``datetime64`` items ISO 8601
                                         (to the microsecond)
numpy scalar                             number / bool / string
pandas ``DataFrame``                     ``{"__type__": "dataframe", "columns": [...],
                                         "data": [[row], ...]}``, plus ``"index": [...]``
                                         when the index is not the default 0..n-1;
                                         NaN / NA / NaT -> ``null``, timestamps ISO 8601
                                         (to the microsecond), timedeltas in seconds
pandas ``Series``                        ``{"__type__": "series", "name": ..., "index":
                                         [...], "data": [...]}`` (same value rules)
pandas ``Index``                         array
polars ``DataFrame``                     as pandas ``DataFrame`` (polars has no index)
polars ``Series``                        as pandas ``Series``, with ``"index"`` = 0..n-1
anything else                            ``{"__type__": "repr", "repr": "<repr(), first
                                         1000 chars>", "type": "module.Class"}``
output stored elsewhere                  ``{"__type__": "ref", "url": "...", "size": N}``
(``encode_result``)
output over the size cap, no             ``{"__type__": "truncated", "size": N}`` and the
storage (``encode_result``)              message gets a top-level ``"truncated": true``
=======================================  ===================================================

``size`` is the byte length of the output's own JSON encoding. Encoding never
raises: a value with no form (or whose conversion fails) becomes a ``repr``
marker, and a ``repr()`` that raises is replaced by the type name.

Known orjson limit: a *numpy* ``datetime64`` array holding ``NaT`` is written
with numpy's sentinel date (1677-09-21); pandas objects handle NaT (-> null).

pandas, polars, numpy and pydantic are never imported here: an object of
theirs can only exist once its library is loaded, so the checks look the
library up in ``sys.modules`` (importing pandas alone costs ~400 ms).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import logging
import sys
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import orjson

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from flowerpower_daemon.project.models import RunResult

__all__ = [
    "REPR_LIMIT",
    "Offloader",
    "dumps",
    "encode_result",
    "fsspec_offloader",
    "loads",
]

log = logging.getLogger(__name__)

Offloader = Callable[[str, str, bytes], str]
"""``offload(run_id, name, data) -> url``: store one output's JSON bytes, return where."""

REPR_LIMIT: Final = 1000
_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_MAX_DEPTH: Final = 200  # below orjson's own limit of 254 nested containers
_TYPE_CACHE_MAX: Final = 1024
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_TRUNCATED_FLAG_BYTES: Final = len(b',"truncated":true')
_CUT_SUFFIX: Final = " ... [truncated]"

# Each encoder takes values of its own type(s) and returns a JSON-able stand-in.
_Encoder = Callable[[Any], object]


# --------------------------------------------------------------------- markers


def _type_name(tp: type) -> str:
    """``module.Qualname`` of a type, without ever raising."""
    module = getattr(tp, "__module__", None) or "?"
    name = getattr(tp, "__qualname__", None) or getattr(tp, "__name__", None) or "?"
    return f"{module}.{name}"


def _repr_marker(obj: object) -> dict[str, str]:
    """The last-resort form: a bounded repr plus the type, falling back to the type name."""
    name = _type_name(type(obj))
    try:
        text = repr(obj)[:REPR_LIMIT]
    except Exception as exc:
        text = f"<{name} object; repr() raised {type(exc).__name__}>"
    return {"__type__": "repr", "repr": text, "type": name}


def _bytes_marker(obj: bytes | bytearray | memoryview) -> dict[str, str]:
    """Bytes as base64 (JSON strings must be text)."""
    raw = obj.tobytes() if isinstance(obj, memoryview) else obj
    return {"__type__": "bytes", "base64": base64.b64encode(raw).decode("ascii")}


# ----------------------------------------------------------- per-type encoders


def _set_to_list(obj: AbstractSet[Any]) -> list[object]:
    """A set as a list, sorted when possible so equal sets encode equally."""
    try:
        return sorted(obj)
    except TypeError:
        return list(obj)


def _isoformat(obj: dt.date | dt.time) -> str:
    """ISO 8601 for datetime/date/time subclasses and tz-aware times orjson declines."""
    return obj.isoformat()


def _seconds(obj: dt.timedelta) -> float:
    """A duration as seconds, the unit every consumer can do arithmetic with."""
    return obj.total_seconds()


def _enum_value(obj: enum.Enum) -> object:
    """An enum member as its value (orjson does this natively; kept for subclasses)."""
    return obj.value


def _dataclass_fields(obj: DataclassInstance) -> dict[str, object]:
    """A dataclass as a dict of its fields, shallow (the encoder recurses itself)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _to_none(obj: object) -> None:
    """Missing-value sentinels (pandas NA/NaT) as null."""
    return None


def _numpy_array(arr: Any) -> object:
    """A numpy array orjson declined (non-contiguous, object, str, 0-d ...) as lists."""
    kind = arr.dtype.kind
    if kind == "M":
        return arr.astype("datetime64[us]").tolist()  # datetimes, NaT -> None
    if kind == "m":
        return arr.astype("timedelta64[us]").tolist()  # timedeltas, NaT -> None
    return arr.tolist()


def _numpy_scalar(obj: Any) -> object:
    """A numpy scalar orjson declined as the matching Python scalar."""
    kind = obj.dtype.kind
    if kind == "M":
        return obj.astype("datetime64[us]").item()
    if kind == "m":
        return obj.astype("timedelta64[us]").item()
    if kind == "f":
        return float(obj)  # longdouble.item() would return a longdouble again
    return obj.item()


def _pandas_values(values: Any) -> Sequence[object]:
    """A Series' or Index's values as Python objects, converted in C where orjson needs no hook."""
    # a per-cell ``default`` call for 100k Timestamps costs seconds; numeric and
    # datetime columns therefore convert vectorised, the rest via object dtype
    np = sys.modules["numpy"]
    dtype = values.dtype
    if isinstance(dtype, sys.modules["pandas"].DatetimeTZDtype):
        return _pandas_aware_datetimes(values.array)
    if isinstance(dtype, np.dtype):
        kind = dtype.kind
        if kind in "biuf":
            return values.to_numpy().tolist()  # type: ignore[no-any-return]
        if kind == "M":  # naive datetimes; NaT -> None
            return values.to_numpy().astype("datetime64[us]").tolist()  # type: ignore[no-any-return]
        if kind == "m":  # seconds; NaT -> NaN -> null
            return (values.to_numpy() / np.timedelta64(1, "s")).tolist()  # type: ignore[no-any-return]
    return values.to_numpy(dtype=object).tolist()  # type: ignore[no-any-return]


_FIXED_ZONES: dict[int, dt.timezone] = {}


def _pandas_aware_datetimes(arr: Any) -> list[dt.datetime | None]:
    """A tz-aware DatetimeArray as datetimes with fixed offsets (same ISO text as Timestamps)."""
    np = sys.modules["numpy"]
    wall = arr.tz_localize(None).to_numpy()  # local wall-clock time
    offsets = (wall - arr.tz_convert(None).to_numpy()).astype("timedelta64[s]").astype(np.int64)
    out: list[dt.datetime | None] = []
    for naive, offset in zip(wall.astype("datetime64[us]").tolist(), offsets.tolist(), strict=True):
        if naive is None:  # NaT
            out.append(None)
            continue
        zone = _FIXED_ZONES.get(offset)
        if zone is None:
            zone = _FIXED_ZONES[offset] = dt.timezone(dt.timedelta(seconds=offset))
        out.append(naive.replace(tzinfo=zone))
    return out


def _pandas_dataframe(df: Any) -> dict[str, object]:
    """A pandas DataFrame in split form: column labels and row lists."""
    out: dict[str, object] = {"__type__": "dataframe", "columns": df.columns.tolist()}
    index = df.index
    if not _is_default_pandas_index(index):
        out["index"] = _pandas_values(index)
    columns = [_pandas_values(df.iloc[:, i]) for i in range(df.shape[1])]
    # rows as tuples: orjson writes them as arrays, no per-row list copy
    out["data"] = list(zip(*columns, strict=True)) if columns else [()] * len(index)
    return out


def _pandas_series(s: Any) -> dict[str, object]:
    """A pandas Series: its name, index labels and values."""
    return {
        "__type__": "series",
        "name": s.name,
        "index": _pandas_values(s.index),
        "data": _pandas_values(s),
    }


def _is_default_pandas_index(index: Any) -> bool:
    """Whether an index is the unnamed 0..n-1 range that carries no information."""
    pd = sys.modules["pandas"]
    return (
        isinstance(index, pd.RangeIndex)
        and index.start == 0
        and index.step == 1
        and index.name is None
    )


def _to_list(obj: Any) -> object:
    """Array-likes with a ``tolist`` (pandas Index, ExtensionArray) as lists."""
    return obj.tolist()


def _to_str(obj: object) -> str:
    """Values whose string form is their canonical text (Decimal, Path, Period)."""
    return str(obj)


def _polars_dataframe(df: Any) -> dict[str, object]:
    """A polars DataFrame in the same split form as a pandas one."""
    return {"__type__": "dataframe", "columns": list(df.columns), "data": df.rows()}


def _polars_series(s: Any) -> dict[str, object]:
    """A polars Series in the pandas Series form, positions standing in for the index."""
    return {
        "__type__": "series",
        "name": s.name,
        "index": list(range(len(s))),
        "data": s.to_list(),
    }


def _pydantic_model(obj: Any) -> object:
    """A pydantic model via its own JSON-mode dump, else its Python-mode dump."""
    try:
        return obj.model_dump(mode="json")
    except Exception:
        return obj.model_dump()


def _resolve_library(tp: type) -> _Encoder | None:
    """The encoder for numpy, pandas, polars and pydantic types, if one is loaded."""
    np = sys.modules.get("numpy")
    if np is not None:
        if issubclass(tp, np.ndarray):
            return _numpy_array
        if issubclass(tp, np.generic):
            return _numpy_scalar
    pd = sys.modules.get("pandas")
    if pd is not None:
        if issubclass(tp, pd.DataFrame):
            return _pandas_dataframe
        if issubclass(tp, pd.Series):
            return _pandas_series
        if tp is type(pd.NaT) or tp is type(pd.NA):
            return _to_none
        if issubclass(tp, pd.Index):
            return _pandas_values
        if issubclass(tp, pd.api.extensions.ExtensionArray):
            return _to_list
        if issubclass(tp, pd.Period | pd.Interval):
            return _to_str
    pl = sys.modules.get("polars")
    if pl is not None:
        if issubclass(tp, pl.DataFrame):
            return _polars_dataframe
        if issubclass(tp, pl.Series):
            return _polars_series
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(tp, pydantic.BaseModel):
        return _pydantic_model
    return None


def _resolve(tp: type) -> _Encoder:
    """Pick the encoder for a type orjson does not handle (called once per type)."""
    if issubclass(tp, bytes | bytearray | memoryview):
        return _bytes_marker
    if issubclass(tp, AbstractSet):
        return _set_to_list
    if issubclass(tp, Decimal | PurePath):
        return _to_str
    if issubclass(tp, enum.Enum):
        return _enum_value
    library = _resolve_library(tp)  # before datetime: pandas NaT subclasses datetime
    if library is not None:
        return library
    if issubclass(tp, dt.date | dt.time):
        return _isoformat
    if issubclass(tp, dt.timedelta):
        return _seconds
    if dataclasses.is_dataclass(tp):
        return _dataclass_fields
    if issubclass(tp, Mapping):
        return dict
    if issubclass(tp, list | tuple | deque):
        return list
    if issubclass(tp, float):
        return float
    return _repr_marker


_ENCODERS: dict[type, _Encoder] = {}


def _default(obj: object) -> object:
    """orjson's hook for values it cannot write: a JSON-able stand-in, never an exception."""
    tp = type(obj)
    encoder = _ENCODERS.get(tp)
    try:
        if encoder is None:
            encoder = _resolve(tp)
            if len(_ENCODERS) < _TYPE_CACHE_MAX:  # bounded: classes can be made per call
                _ENCODERS[tp] = encoder
        return encoder(obj)
    except Exception:
        return _repr_marker(obj)


# ------------------------------------------------------------- slow safe path


def _safe_str(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates become ``?``, the rest is kept."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _safe_key(key: object) -> object:
    """A dict key orjson accepts with OPT_NON_STR_KEYS, else its ``str()``."""
    if isinstance(key, str):
        return _safe_str(key)
    if key is None or type(key) in (bool, float, dt.datetime, dt.date, uuid.UUID):
        return key
    if type(key) is int:
        return key if _INT_MIN <= key <= _INT_MAX else str(key)
    if isinstance(key, enum.Enum):
        return _safe_key(key.value)
    if isinstance(key, int | float):
        return _safe_key(int(key) if isinstance(key, int) else float(key))
    if isinstance(key, dt.date | dt.time):
        return _isoformat(key)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(key, np.generic):
        return _safe_key(_numpy_scalar(key))
    try:
        return _safe_str(str(key))
    except Exception:
        return _type_name(type(key))


def _safe_value(obj: object, depth: int, path: set[int]) -> object:
    """Rebuild ``obj`` from plain JSON types in Python (only after orjson refused it)."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return _safe_str(obj)
    if isinstance(obj, int) and not isinstance(obj, enum.Enum):
        return obj if _INT_MIN <= obj <= _INT_MAX else str(obj)
    if isinstance(obj, float):
        return float(obj)
    if type(obj) is orjson.Fragment:  # pre-encoded output inside a result message
        return obj
    if depth <= 0:
        return _repr_marker(obj)
    if type(obj) in (dt.datetime, dt.date, uuid.UUID) or (
        type(obj) is dt.time and obj.tzinfo is None
    ):
        return obj
    if isinstance(obj, dict | list | tuple):
        if id(obj) in path:
            return {
                "__type__": "repr",
                "repr": "<circular reference>",
                "type": _type_name(type(obj)),
            }
        path.add(id(obj))
        try:
            if isinstance(obj, dict):
                return {_safe_key(k): _safe_value(v, depth - 1, path) for k, v in obj.items()}
            return [_safe_value(v, depth - 1, path) for v in obj]
        finally:
            path.discard(id(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        converted: object = _dataclass_fields(obj)
    else:
        converted = _default(obj)
    if converted is obj:  # an encoder that made no progress
        return _repr_marker(obj)
    return _safe_value(converted, depth - 1, path)


# ----------------------------------------------------------------- public API


def dumps(obj: object) -> bytes:
    """JSON bytes in the documented forms; never raises, whatever ``obj`` holds."""
    try:
        return orjson.dumps(obj, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        pass  # too-big int, bad key, surrogate, cycle/too deep, tz-aware time ...
    try:
        return orjson.dumps(_safe_value(obj, _MAX_DEPTH, set()), option=_OPTIONS)
    except Exception:
        return orjson.dumps(_repr_marker(obj))


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON (the inverse of :func:`dumps` for the plain types; markers stay dicts)."""
    return orjson.loads(data)


def encode_result(
    result: RunResult,
    *,
    max_bytes: int | None = None,
    offload: Offloader | None = None,
) -> bytes:
    """The result message as JSON bytes, kept under ``max_bytes`` without silently losing outputs.

    When the message is too big, outputs are replaced biggest-first: by a ``ref``
    marker after ``offload(run_id, name, data)`` stored the output's JSON, or by a
    ``truncated`` marker (also when ``offload`` raises) plus ``"truncated": true``
    at the top level. If the envelope alone is still too big, the error message
    is shortened; ids, trigger and times are never cut, so ``max_bytes`` is a
    target, not a guarantee. ``offload`` does blocking I/O: from async code, run
    this in a worker thread.
    """
    full = result.encoded
    if full is None:
        full = result.encoded = dumps(result.to_dict(raw_times=True))
    if max_bytes is None or len(full) <= max_bytes:
        return full

    message = result.to_dict(raw_times=True)
    # outputs encoded once each, spliced in as fragments: sizes known, no re-encoding
    encoded = {name: dumps(value) for name, value in result.outputs.items()}
    fragments: dict[str, orjson.Fragment] = {
        name: orjson.Fragment(b) for name, b in encoded.items()
    }
    message["outputs"] = fragments
    data = dumps(message)
    if len(data) <= max_bytes:
        return data
    size = len(data)
    for name in sorted(encoded, key=lambda n: len(encoded[n]), reverse=True):
        if size <= max_bytes:
            break
        blob = encoded[name]
        marker = _replacement(result.run_id, str(name), blob, offload)
        replacement = orjson.dumps(marker)
        if len(replacement) >= len(blob):
            continue  # the marker would not be smaller than the output itself
        fragments[name] = orjson.Fragment(replacement)
        size += len(replacement) - len(blob)
        if marker["__type__"] == "truncated" and not message.get("truncated"):
            message["truncated"] = True
            size += _TRUNCATED_FLAG_BYTES

    data = dumps(message)
    for _ in range(3):  # the cut is estimated from the average encoded width of a char
        if len(data) <= max_bytes or not _shorten_error(message, len(data) - max_bytes):
            break
        data = dumps(message)
    return data


def _replacement(
    run_id: str, name: str, blob: bytes, offload: Offloader | None
) -> dict[str, object]:
    """A ``ref`` marker for an output stored by ``offload``, else a ``truncated`` one."""
    if offload is not None:
        try:
            return {"__type__": "ref", "url": offload(run_id, name, blob), "size": len(blob)}
        except Exception as exc:
            log.warning("offloading output %r of run %s failed: %r", name, run_id, exc)
            return {"__type__": "truncated", "size": len(blob), "error": repr(exc)[:200]}
    return {"__type__": "truncated", "size": len(blob)}


def _shorten_error(message: dict[str, object], excess: int) -> bool:
    """Cut the error message by about ``excess`` encoded bytes; False if nothing to cut."""
    error = message.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return False
    text: str = error["message"]
    if text.endswith(_CUT_SUFFIX):
        text = text[: -len(_CUT_SUFFIX)]
    if not text:
        return False
    width = len(dumps(text)) - 2  # encoded bytes without the quotes
    flag = 0 if message.get("truncated") else _TRUNCATED_FLAG_BYTES
    budget = width - excess - len(_CUT_SUFFIX) - flag
    keep = max(0, len(text) * budget // width)
    error["message"] = text[:keep] + _CUT_SUFFIX
    message["truncated"] = True
    return True


def fsspec_offloader(base_url: str, **storage_options: object) -> Offloader:
    """An ``offload`` writing ``{base_url}/{run_id}/{name}.json`` on any fsspec filesystem."""
    import fsspec  # deferred: only daemons that offload pay for it

    fs, root = fsspec.core.url_to_fs(base_url, **storage_options)
    root = root.rstrip("/")
    base = base_url.rstrip("/")

    def offload(run_id: str, name: str, data: bytes) -> str:
        """Store one output's JSON and return its URL (names are %-quoted: no ``/`` or ``..``)."""
        rel = f"{quote(run_id, safe='')}/{quote(name, safe='')}.json"
        directory = f"{root}/{quote(run_id, safe='')}"
        fs.makedirs(directory, exist_ok=True)
        fs.pipe_file(f"{root}/{rel}", data)
        return f"{base}/{rel}"

    return offload
