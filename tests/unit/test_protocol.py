"""The control protocol's parsing and validation, without a socket."""

from __future__ import annotations

import orjson
import pytest

from flowerpower_daemon.control.protocol import (
    COMMANDS,
    ERROR_CODES,
    ProtocolError,
    dump_line,
    error_message,
    event_message,
    ok_message,
    parse_request,
    validate_args,
)


def _code(line: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code in ERROR_CODES
    return info.value.code


def test_a_valid_request_parses() -> None:
    """id, cmd and args come back as given; args may be omitted."""
    req = parse_request(b'{"id": 7, "cmd": "jobs", "args": {"limit": 5, "pipeline": "p"}}')
    assert (req.id, req.cmd, dict(req.args)) == (7, "jobs", {"limit": 5, "pipeline": "p"})
    assert parse_request(b'{"id": "a", "cmd": "status"}').args == {}
    assert parse_request(b'{"cmd": "ping", "args": null}').id is None


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1]", "bad_json"),
        (b'"text"', "bad_json"),
        (b'{"id": 1}', "bad_request"),
        (b'{"id": 1, "cmd": 5}', "bad_request"),
        (b'{"id": true, "cmd": "ping"}', "bad_request"),
        (b'{"id": 1.5, "cmd": "ping"}', "bad_request"),
        (b'{"id": 1, "cmd": "ping", "args": []}', "bad_request"),
        (b'{"id": 1, "cmd": "ping", "extra": 1}', "bad_request"),
        (b'{"id": 1, "cmd": "frobnicate"}', "unknown_command"),
        (b'{"id": 1, "cmd": "run", "args": {}}', "bad_args"),
        (b'{"id": 1, "cmd": "run", "args": {"pipeline": 3}}', "bad_args"),
        (b'{"id": 1, "cmd": "jobs", "args": {"limit": true}}', "bad_args"),
        (b'{"id": 1, "cmd": "jobs", "args": {"limit": 2.5}}', "bad_args"),
        (b'{"id": 1, "cmd": "status", "args": {"verbose": 1}}', "bad_args"),
    ],
)
def test_bad_requests_get_their_error_code(line: bytes, code: str) -> None:
    """Each kind of bad line maps to one documented error code."""
    assert _code(line) == code


def test_errors_keep_the_request_id_when_it_was_readable() -> None:
    """An answer to a bad request still carries the client's id."""
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"id": 42, "cmd": "job", "args": {}}')
    assert info.value.request_id == 42
    assert "missing argument 'id'" in info.value.message


def test_json_types_are_checked_like_json() -> None:
    """An int is a fine float, a bool is not an int, null drops an optional argument."""
    assert validate_args("run", {"pipeline": "p", "run_in": 5}) == {"pipeline": "p", "run_in": 5}
    assert validate_args("run", {"pipeline": "p", "inputs": None}) == {"pipeline": "p"}
    with pytest.raises(ProtocolError):
        validate_args("run", {"pipeline": "p", "wait": 1})


def test_every_command_has_a_spec_and_messages_are_one_line() -> None:
    """The command table is complete and answers are newline-terminated JSON."""
    assert {
        "status",
        "run",
        "jobs",
        "job",
        "cancel",
        "schedule_add",
        "schedule_rm",
        "pause",
        "resume",
        "reload",
        "events",
        "stop",
        "pipelines",
        "triggers",
        "schedules",
    } <= set(COMMANDS)
    line = dump_line(ok_message(1, {"a": "b\nc"}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {"id": 1, "ok": True, "result": {"a": "b\nc"}}
    assert orjson.loads(dump_line(error_message(2, "not_found", "x", [1]))) == {
        "id": 2,
        "ok": False,
        "error": {"code": "not_found", "message": "x", "details": [1]},
    }
    assert event_message(3, {"type": "t"}) == {"id": 3, "event": {"type": "t"}}
