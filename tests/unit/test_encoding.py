"""The documented JSON forms of flowerpower_daemon.project.encoding, its size cap and its fallbacks."""

from __future__ import annotations

import ast
import base64
import collections
import dataclasses
import enum
import importlib.util
import inspect
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pydantic
import pytest

from flowerpower_daemon.project import encoding
from flowerpower_daemon.project.encoding import dumps, encode_result, fsspec_offloader, loads
from flowerpower_daemon.project.models import (
    AttemptInfo,
    ErrorInfo,
    RunResult,
    RunStatus,
    TriggerInfo,
)

HAS_POLARS = importlib.util.find_spec("polars") is not None
needs_polars = pytest.mark.skipif(not HAS_POLARS, reason="polars is not installed")

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(milliseconds=1500)


def make_result(
    outputs: Mapping[str, Any],
    *,
    error: ErrorInfo | None = None,
    run_id: str = "run-1",
) -> RunResult:
    """A finished RunResult with the given outputs, as the runner would build it."""
    status: RunStatus = "failed" if error else "success"
    return RunResult(
        run_id=run_id,
        pipeline="sales",
        status=status,
        outputs=outputs,
        error=error,
        attempts=(AttemptInfo(number=1, started_at=T0, finished_at=T1, status=status),),
        queued_at=T0,
        started_at=T0,
        finished_at=T1,
        trigger=TriggerInfo(name="on-data", type="mqtt", topic="sensors/1"),
    )


def roundtrip(obj: Any) -> Any:
    """Encode with ``dumps`` and parse back, to compare with plain Python values."""
    data = dumps(obj)
    assert isinstance(data, bytes)
    return loads(data)


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A unique ``memory://`` directory, removed after the test."""
    root = f"/enc-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------ JSON forms


def test_datetime_date_time_are_iso_8601() -> None:
    """datetimes, dates and times become ISO 8601 strings, keeping the UTC offset."""
    value = {
        "aware": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        "offset": datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
        "naive": datetime(2024, 5, 1, 12, 0),
        "date": date(2024, 5, 1),
        "time": time(7, 5, 3),
        "aware_time": time(7, 5, tzinfo=UTC),
    }
    assert roundtrip(value) == {
        "aware": "2024-05-01T12:30:15.123456+00:00",
        "offset": "2024-05-01T12:00:00+02:00",
        "naive": "2024-05-01T12:00:00",
        "date": "2024-05-01",
        "time": "07:05:03",
        "aware_time": "07:05:00+00:00",
    }


def test_timedelta_is_total_seconds() -> None:
    """A timedelta becomes its total seconds as a number."""
    assert roundtrip(timedelta(minutes=1, seconds=30, milliseconds=500)) == 90.5


def test_bytes_are_base64_marker() -> None:
    """bytes and bytearray become a base64 marker that decodes to the same bytes."""
    raw = bytes(range(256))
    out = roundtrip({"b": raw, "ba": bytearray(b"xy")})
    assert out["b"] == {"__type__": "bytes", "base64": base64.b64encode(raw).decode()}
    assert base64.b64decode(out["b"]["base64"]) == raw
    assert out["ba"] == {"__type__": "bytes", "base64": "eHk="}


def test_numpy_arrays_are_nested_lists() -> None:
    """numpy arrays become nested lists, also when orjson cannot take them natively."""
    assert roundtrip(np.arange(6, dtype=np.int32).reshape(2, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert roundtrip(np.array([1.5, np.nan])) == [1.5, None]
    assert roundtrip(np.arange(6).reshape(2, 3)[:, ::2]) == [[0, 2], [3, 5]]  # non-contiguous
    assert roundtrip(np.array(["a", "b"])) == ["a", "b"]
    assert roundtrip(np.array([1, "x"], dtype=object)) == [1, "x"]
    assert roundtrip(np.array(2.5)) == 2.5


def test_numpy_datetime64_arrays_are_iso_8601() -> None:
    """datetime64 items become ISO 8601 strings; NaT is null where the hook converts."""
    arr = np.array(["2024-05-01T12:00:00", "2024-05-02"], dtype="datetime64[s]")
    assert roundtrip(arr) == ["2024-05-01T12:00:00", "2024-05-02T00:00:00"]
    with_nat = np.array(["2024-05-01", "NaT", "2024-05-03", "NaT"], dtype="datetime64[ns]")
    assert roundtrip(with_nat[::2]) == ["2024-05-01T00:00:00", "2024-05-03T00:00:00"]
    assert roundtrip(with_nat[1::2]) == [None, None]
    assert roundtrip(np.array([90, 1], dtype="timedelta64[s]")) == [90.0, 1.0]


def test_numpy_scalars_are_numbers() -> None:
    """numpy scalars become plain JSON numbers, bools and strings."""
    value = {
        "i": np.int64(7),
        "u": np.uint8(255),
        "f": np.float32(1.5),
        "ld": np.longdouble(2.5),
        "b": np.bool_(True),
        "s": np.str_("x"),
        "nat": np.datetime64("NaT"),
        "dt": np.datetime64("2024-05-01T12:00:00.123456789"),
    }
    assert roundtrip(value) == {
        "i": 7,
        "u": 255,
        "f": 1.5,
        "ld": 2.5,
        "b": True,
        "s": "x",
        "nat": None,
        "dt": "2024-05-01T12:00:00.123456",
    }


def test_pandas_dataframe_is_split_form() -> None:
    """A DataFrame becomes columns plus rows, NaN/NA/NaT as null and timestamps ISO 8601."""
    df = pd.DataFrame(
        {
            "a": [1, 2],
            "x": [1.5, np.nan],
            "n": pd.array([3, None], dtype="Int64"),
            "t": pd.to_datetime(["2024-05-01 12:00", None]).tz_localize("UTC"),
            "s": ["u", None],
        }
    )
    assert roundtrip(df) == {
        "__type__": "dataframe",
        "columns": ["a", "x", "n", "t", "s"],
        "data": [
            [1, 1.5, 3, "2024-05-01T12:00:00+00:00", "u"],
            [2, None, None, None, None],
        ],
    }


def test_pandas_dataframe_keeps_a_meaningful_index() -> None:
    """A DataFrame whose index is not the default 0..n-1 also carries ``index``."""
    idx = pd.DatetimeIndex(["2024-05-01", "2024-05-02"], name="day")
    out = roundtrip(pd.DataFrame({"v": [1, 2]}, index=idx))
    assert out == {
        "__type__": "dataframe",
        "columns": ["v"],
        "index": ["2024-05-01T00:00:00", "2024-05-02T00:00:00"],
        "data": [[1], [2]],
    }


def test_pandas_datetime_and_timedelta_columns() -> None:
    """Naive, tz-aware (across DST) and timedelta columns match the scalar forms."""
    aware = pd.date_range("2024-03-31 01:00", periods=2, freq="h", tz="Europe/Berlin")
    df = pd.DataFrame(
        {
            "naive": pd.to_datetime(["2024-05-01 12:00:00.5", None]),
            "aware": aware,
            "took": pd.to_timedelta(["1.5s", None]),
        },
        index=pd.Index(aware, name="at"),
    )
    out = roundtrip(df)
    assert out["index"] == ["2024-03-31T01:00:00+01:00", "2024-03-31T03:00:00+02:00"]
    assert out["data"] == [
        ["2024-05-01T12:00:00.500000", "2024-03-31T01:00:00+01:00", 1.5],
        [None, "2024-03-31T03:00:00+02:00", None],
    ]
    assert out["index"] == [roundtrip(ts) for ts in aware]  # same text as Timestamp scalars


def test_pandas_series_has_name_index_data() -> None:
    """A Series becomes name, index labels and values, NaN as null."""
    s = pd.Series([1.0, np.nan, 3.0], index=["a", "b", "c"], name="price")
    assert roundtrip(s) == {
        "__type__": "series",
        "name": "price",
        "index": ["a", "b", "c"],
        "data": [1.0, None, 3.0],
    }


def test_pandas_dataframe_without_columns() -> None:
    """A DataFrame with rows but no columns keeps one empty row per index label."""
    assert roundtrip(pd.DataFrame(index=[7, 8])) == {
        "__type__": "dataframe",
        "columns": [],
        "index": [7, 8],
        "data": [[], []],
    }


def test_pandas_scalars_and_index() -> None:
    """pandas Timestamp, Timedelta, NaT, NA and Index have their documented forms."""
    value = {
        "ts": pd.Timestamp("2024-05-01 12:00", tz="UTC"),
        "td": pd.Timedelta(seconds=2),
        "nat": pd.NaT,
        "na": pd.NA,
        "idx": pd.Index([3, 4]),
    }
    assert roundtrip(value) == {
        "ts": "2024-05-01T12:00:00+00:00",
        "td": 2.0,
        "nat": None,
        "na": None,
        "idx": [3, 4],
    }


@needs_polars
def test_polars_dataframe_is_split_form() -> None:
    """A polars DataFrame has the pandas split form (no index), nulls as null."""
    import polars as pl

    df = pl.DataFrame({"a": [1, 2], "t": [date(2024, 5, 1), None]})
    assert roundtrip(df) == {
        "__type__": "dataframe",
        "columns": ["a", "t"],
        "data": [[1, "2024-05-01"], [2, None]],
    }


@needs_polars
def test_polars_series_has_name_index_data() -> None:
    """A polars Series has the pandas Series form with positions as the index."""
    import polars as pl

    assert roundtrip(pl.Series("v", [1.5, None])) == {
        "__type__": "series",
        "name": "v",
        "index": [0, 1],
        "data": [1.5, None],
    }


@dataclasses.dataclass
class Point:
    """A dataclass output with a field orjson needs the hook for."""

    x: int
    price: Decimal


def test_dataclass_is_dict() -> None:
    """A dataclass becomes an object of its fields (nested values converted too)."""
    assert roundtrip(Point(1, Decimal("2.50"))) == {"x": 1, "price": "2.50"}


class Reading(pydantic.BaseModel):
    """A pydantic model output."""

    sensor: str
    at: datetime
    tags: set[str]


def test_pydantic_model_is_model_dump_json() -> None:
    """A pydantic model becomes ``model_dump(mode="json")``."""
    model = Reading(sensor="s1", at=T0, tags={"a"})
    assert roundtrip(model) == model.model_dump(mode="json")
    assert roundtrip(model)["at"] in {"2024-05-01T12:00:00Z", "2024-05-01T12:00:00+00:00"}


def test_sets_are_lists() -> None:
    """sets and frozensets become lists, sorted when their items compare."""
    assert roundtrip({3, 1, 2}) == [1, 2, 3]
    assert roundtrip(frozenset({"b", "a"})) == ["a", "b"]
    assert sorted(roundtrip({1, "a"}), key=str) == [1, "a"]


def test_decimal_is_string() -> None:
    """A Decimal becomes its exact string."""
    assert roundtrip(Decimal("1.10")) == "1.10"


def test_uuid_is_string() -> None:
    """A UUID becomes its canonical string."""
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert roundtrip(u) == "12345678-1234-5678-1234-567812345678"


def test_path_is_string() -> None:
    """pathlib paths become strings."""
    assert roundtrip([Path("/tmp/x.csv"), PurePosixPath("a/b")]) == ["/tmp/x.csv", "a/b"]


class Color(enum.Enum):
    """An enum output."""

    RED = "red"
    PRICE = Decimal("1.5")


def test_enum_is_value() -> None:
    """An Enum member becomes its value (converted itself when needed)."""
    assert roundtrip([Color.RED, Color.PRICE]) == ["red", "1.5"]


def test_nan_and_infinity_are_null() -> None:
    """NaN and +/-Infinity floats become null, as documented."""
    assert roundtrip([float("nan"), float("inf"), -float("inf"), 1.0]) == [None, None, None, 1.0]


def test_containers_and_keys() -> None:
    """namedtuples, deques and Mappings are arrays/objects; non-str keys become strings."""
    pair = collections.namedtuple("pair", "a b")
    value = {
        "nt": pair(1, 2),
        "dq": collections.deque([1, 2]),
        "keys": {1: "int", None: "none", date(2024, 5, 1): "date", (1, 2): "tuple"},
        "np_key": {np.int64(3): "x"},
    }
    assert roundtrip(value) == {
        "nt": [1, 2],
        "dq": [1, 2],
        "keys": {"1": "int", "null": "none", "2024-05-01": "date", "(1, 2)": "tuple"},
        "np_key": {"3": "x"},
    }


# ------------------------------------------------------- fallbacks, never raise


class Opaque:
    """An object with no JSON form but a working repr."""

    def __repr__(self) -> str:
        return "Opaque(" + "x" * 5000 + ")"


class BrokenRepr:
    """An object whose __repr__ raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_unknown_object_is_repr_marker() -> None:
    """Anything else becomes a repr marker, the repr cut to 1000 characters."""
    out = roundtrip(Opaque())
    assert out["__type__"] == "repr"
    assert out["type"] == f"{__name__}.Opaque"
    assert out["repr"] == ("Opaque(" + "x" * 5000)[:1000]
    assert len(out["repr"]) == encoding.REPR_LIMIT


def test_broken_repr_falls_back_to_type_name() -> None:
    """An object whose __repr__ raises still encodes, naming its type."""
    out = roundtrip({"bad": BrokenRepr()})["bad"]
    assert out["__type__"] == "repr"
    assert out["type"] == f"{__name__}.BrokenRepr"
    assert f"{__name__}.BrokenRepr" in out["repr"]


def test_hostile_values_never_raise() -> None:
    """Huge ints, lone surrogates, cycles and deep nesting encode instead of raising."""
    cycle: list[Any] = [1]
    cycle.append(cycle)
    deep: list[Any] = []
    cur = deep
    for _ in range(400):
        nxt: list[Any] = []
        cur.append(nxt)
        cur = nxt
    out = roundtrip(
        {
            "big": 2**70,
            "neg": -(2**70),
            "text": "a\ud800b",
            "tz_time": time(1, tzinfo=UTC),
            "cycle": cycle,
            "deep": deep,
            "ok": 1,
        }
    )
    assert out["big"] == str(2**70)
    assert out["neg"] == str(-(2**70))
    assert out["text"] == "a?b"
    assert out["tz_time"] == "01:00:00+00:00"
    assert out["cycle"][0] == 1
    assert out["cycle"][1]["repr"] == "<circular reference>"
    assert out["ok"] == 1


class BrokenMapping(Mapping[str, int]):
    """A Mapping whose iteration raises, so converting it to a dict fails."""

    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("cannot iterate")

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "BrokenMapping()"


def test_failing_conversion_becomes_repr_marker() -> None:
    """A value whose documented conversion raises becomes a repr marker instead."""
    assert roundtrip({"m": BrokenMapping()}) == {
        "m": {"__type__": "repr", "repr": "BrokenMapping()", "type": f"{__name__}.BrokenMapping"}
    }


def test_nested_structures() -> None:
    """Forms apply at any depth inside dicts, lists and tuples."""
    value = {
        "rows": [
            {"when": date(2024, 5, 1), "blob": b"\x00", "tags": {"a"}},
            (Decimal("1"), Path("/p"), [np.float64(0.5), np.array([1, 2])]),
        ],
        "frame": {"df": pd.DataFrame({"a": [1]})},
    }
    assert roundtrip(value) == {
        "rows": [
            {"when": "2024-05-01", "blob": {"__type__": "bytes", "base64": "AA=="}, "tags": ["a"]},
            ["1", "/p", [0.5, [1, 2]]],
        ],
        "frame": {"df": {"__type__": "dataframe", "columns": ["a"], "data": [[1]]}},
    }


def test_no_heavy_imports_in_module() -> None:
    """encoding.py never imports pandas, numpy, polars or pydantic itself (400 ms for pandas)."""
    tree = ast.parse(inspect.getsource(encoding))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pandas", "numpy", "polars", "pydantic"}


# -------------------------------------------------------------- result messages


def test_small_result_skips_default_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typical result of floats, ints and strings never calls the default hook."""
    calls: list[object] = []
    real = encoding._default

    def spy(obj: Any) -> Any:
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(encoding, "_default", spy)
    result = make_result({"total": 12.5, "count": 3, "label": "ok", "flags": [True, None]})
    encode_result(result)
    encode_result(result, max_bytes=10_000)
    dumps({"x": 1.0})
    assert calls == []


def test_result_round_trips_through_loads() -> None:
    """A normal result encodes to the result message of the README and parses back equal to to_dict()."""
    result = make_result({"total": 12.5, "count": 3, "label": "ok"})
    message = loads(encode_result(result))
    assert message == result.to_dict()
    assert message["outputs"] == {"total": 12.5, "count": 3, "label": "ok"}
    assert message["trigger"] == {"name": "on-data", "type": "mqtt", "topic": "sensors/1"}
    assert message["duration_ms"] == 1500.0
    assert "truncated" not in message


@pytest.mark.parametrize(
    "when",
    [
        T0,  # whole seconds: no fraction
        T0 + timedelta(microseconds=5),
        datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        datetime(2024, 5, 1, 12, 0, 0, 123456),  # naive: no offset
    ],
)
def test_result_times_are_written_as_isoformat(when: datetime) -> None:
    """The result message's times (encoded by orjson from the datetimes) are the text of
    ``isoformat()``: ``+00:00`` offsets, microseconds unless zero, byte for byte."""
    result = make_result({"x": 1})
    result.queued_at = result.started_at = when
    result.finished_at = when + timedelta(seconds=1)
    assert encode_result(result) == dumps(result.to_dict())
    message = loads(encode_result(result))
    assert message["queued_at"] == message["started_at"] == when.isoformat()
    assert message["finished_at"] == result.finished_at.isoformat()


def test_encode_result_converts_outputs() -> None:
    """Outputs in a result message use the documented forms."""
    result = make_result({"when": T0, "frame": pd.Series([1], name="s")})
    outputs = loads(encode_result(result))["outputs"]
    assert outputs == {
        "when": "2024-05-01T12:00:00+00:00",
        "frame": {"__type__": "series", "name": "s", "index": [0], "data": [1]},
    }


def test_size_cap_offloads_biggest_outputs(memory_url: str) -> None:
    """Over max_bytes, the biggest outputs go to fsspec storage and are referenced by URL."""
    big = list(range(5000))
    medium = "m" * 3000
    result = make_result({"big": big, "medium": medium, "small": 1}, run_id="r-42")
    offload = fsspec_offloader(memory_url)

    data = encode_result(result, max_bytes=4000, offload=offload)
    message = loads(data)

    assert len(data) <= 4000
    big_bytes = dumps(big)
    assert message["outputs"]["big"] == {
        "__type__": "ref",
        "url": f"{memory_url}/r-42/big.json",
        "size": len(big_bytes),
    }
    assert message["outputs"]["medium"] == medium  # fits once "big" is gone
    assert message["outputs"]["small"] == 1
    assert "truncated" not in message
    with fsspec.open(message["outputs"]["big"]["url"], "rb") as f:
        stored = f.read()
    assert stored == big_bytes
    assert loads(stored) == big


def test_size_cap_offloads_until_it_fits(memory_url: str) -> None:
    """Outputs are offloaded biggest first, as many as needed; names are URL-quoted."""
    result = make_result({"a/b": "a" * 2000, "c": "c" * 3000, "d": "d" * 10}, run_id="r-1")
    calls: list[tuple[str, str, int]] = []
    store = fsspec_offloader(memory_url)

    def offload(run_id: str, name: str, data: bytes) -> str:
        calls.append((run_id, name, len(data)))
        return store(run_id, name, data)

    message = loads(encode_result(result, max_bytes=1000, offload=offload))
    assert calls == [("r-1", "c", 3002), ("r-1", "a/b", 2002)]
    assert message["outputs"]["a/b"]["url"] == f"{memory_url}/r-1/a%2Fb.json"
    with fsspec.open(message["outputs"]["a/b"]["url"], "rb") as f:
        assert loads(f.read()) == "a" * 2000
    assert message["outputs"]["d"] == "d" * 10


def test_size_cap_without_offload_truncates_with_flag() -> None:
    """Without offload, too-big outputs become truncated markers and the message says so."""
    big = "x" * 5000
    result = make_result({"big": big, "small": 2})
    data = encode_result(result, max_bytes=1000)
    message = loads(data)
    assert len(data) <= 1000
    assert message["truncated"] is True
    assert message["outputs"] == {
        "big": {"__type__": "truncated", "size": len(dumps(big))},
        "small": 2,
    }


def test_failed_offload_truncates_instead_of_raising() -> None:
    """When offload raises, the output is marked truncated (with the error), not lost silently."""

    def offload(run_id: str, name: str, data: bytes) -> str:
        raise OSError("bucket unavailable")

    message = loads(
        encode_result(make_result({"big": "x" * 5000}), max_bytes=1000, offload=offload)
    )
    assert message["truncated"] is True
    marker = message["outputs"]["big"]
    assert marker["__type__"] == "truncated"
    assert marker["size"] == 5002
    assert "bucket unavailable" in marker["error"]


def test_huge_error_message_is_shortened() -> None:
    """When the envelope alone is too big, the error message is cut and flagged."""
    error = ErrorInfo(type="ValueError", message="é" * 20_000, node="load")
    data = encode_result(make_result({}, error=error), max_bytes=2000)
    message = loads(data)
    assert len(data) <= 2000
    assert message["truncated"] is True
    assert message["error"]["message"].endswith("[truncated]")
    assert message["error"]["message"].startswith("é")


def test_under_the_cap_is_unchanged() -> None:
    """A message under max_bytes is the same bytes as without a cap, offload unused."""
    result = make_result({"v": list(range(10))})

    def never(run_id: str, name: str, data: bytes) -> str:
        pytest.fail("offload called")

    assert encode_result(result, max_bytes=10_000, offload=never) == encode_result(result)


def test_fsspec_offloader_writes_under_run_id(memory_url: str) -> None:
    """fsspec_offloader stores bytes at {base_url}/{run_id}/{name}.json and returns that URL."""
    url = fsspec_offloader(memory_url + "/")("run/7", "out", b'{"a":1}')
    assert url == f"{memory_url}/run%2F7/out.json"
    with fsspec.open(url, "rb") as f:
        assert f.read() == b'{"a":1}'


def test_fsspec_offloader_creates_local_directories(tmp_path: Path) -> None:
    """On local disk, fsspec_offloader creates the run directory before writing."""
    url = fsspec_offloader(str(tmp_path / "outputs"))("r-9", "table", b"[1]")
    assert url == f"{tmp_path}/outputs/r-9/table.json"
    assert (tmp_path / "outputs" / "r-9" / "table.json").read_bytes() == b"[1]"
