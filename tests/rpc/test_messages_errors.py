"""Message validation and the error mapping to and from the wire."""

from __future__ import annotations

from typing import Any

import pytest

from polykey.errors import PolykeyError
from polykey.rpc import (
    DEFAULT_ERROR_REGISTRY,
    ErrorCode,
    ErrorObject,
    ErrorRegistry,
    ErrorResponse,
    Notification,
    Request,
    Response,
    RPCError,
    RPCInvalidRequest,
    RPCParseError,
    RPCRemoteError,
    RPCRemoteTimedOut,
    RPCTimedOut,
    StreamCode,
    error_from_wire,
    error_to_wire,
    parse_request,
    parse_response,
)
from polykey.rpc._errors import code_for_exception


def test_request_validation_is_loose_like_js_rpc() -> None:
    assert parse_request({"method": "m"}) == Notification("m")
    assert parse_request({"method": "m", "params": 5, "id": None}) == Request("m", 5)
    assert parse_request({"jsonrpc": "1.0", "method": "m", "id": 3}).id == 3  # type: ignore[union-attr]
    bad: object
    for bad in [[], "m", None, {}, {"method": 1}, {"method": "m", "id": {}}]:
        with pytest.raises(RPCInvalidRequest):
            parse_request(bad)


def test_response_needs_exactly_one_of_result_and_error() -> None:
    assert parse_response({"result": {"a": 1}, "id": None}) == Response({"a": 1})
    assert parse_response({"result": None}) == Response(None)
    err = parse_response(
        {"error": {"code": -32006, "message": "m", "data": {}}, "id": None}
    )
    assert err == ErrorResponse(ErrorObject(-32006, "m", {}))
    for bad in [
        [],
        {},
        {"result": 1, "error": {"code": 1, "message": ""}},
        {"error": {"code": "x", "message": ""}},
        {"error": {"code": 1}},
        {"error": 5},
        {"result": 1, "id": []},
    ]:
        with pytest.raises(RPCParseError):
            parse_response(bad)


def test_to_wire_shapes() -> None:
    assert Request("m", {"a": 1}).to_wire() == {
        "jsonrpc": "2.0",
        "method": "m",
        "params": {"a": 1},
        "id": None,
    }
    assert Response({}).to_wire() == {"jsonrpc": "2.0", "result": {}, "id": None}
    assert "id" not in Notification("m").to_wire()


def test_hierarchy_and_codes() -> None:
    assert issubclass(RPCError, PolykeyError)
    assert RPCTimedOut.code == -32008
    assert RPCRemoteError.code == ErrorCode.RPC_REMOTE
    assert int(ErrorCode.RPC_REMOTE) == -32006
    assert issubclass(RPCRemoteTimedOut, RPCTimedOut)
    assert code_for_exception(RPCTimedOut()) == StreamCode.TIMED_OUT
    assert int(StreamCode.TIMED_OUT) == 7
    assert code_for_exception(ValueError()) == StreamCode.UNKNOWN


def test_handler_errors_carry_no_trace_or_path() -> None:
    try:
        raise ValueError("cannot open /home/alice/.ssh/id_ed25519 for user")
    except ValueError as exc:
        wire = error_to_wire(exc)
    assert wire["code"] == -32006
    assert wire["data"] == {
        "type": "ValueError",
        "message": "cannot open <path> for user",
        "code": -32006,
        "data": {"stack": "ValueError: cannot open <path> for user"},
    }
    assert "Traceback" not in repr(wire)
    timeout = error_to_wire(RPCTimedOut())
    assert timeout["code"] == -32008
    assert timeout["data"]["type"] == "ErrorRPCTimedOut"


def test_round_trip_rebuilds_registered_types() -> None:
    remote = error_from_wire(error_to_wire(KeyError("k")), method="m")
    assert isinstance(remote, RPCRemoteError)
    assert remote.remote_type == "KeyError"
    assert isinstance(remote.error, KeyError)
    assert remote.method == "m"

    class Secret(Exception):
        pass

    remote = error_from_wire(error_to_wire(Secret("no")))
    assert remote.remote_type == "Secret"
    assert remote.error is None  # not registered: not rebuilt
    registry = DEFAULT_ERROR_REGISTRY.copy()
    registry.register(Secret)
    assert isinstance(
        error_from_wire(error_to_wire(Secret("no")), registry).error, Secret
    )
    assert isinstance(ErrorRegistry().rebuild("ValueError", None, "x"), type(None))


@pytest.mark.parametrize(
    ("data", "rtype", "message", "cls"),
    [
        # a plain JS Error, as js-rpc's fromError writes it
        (
            {
                "type": "TypeError",
                "message": "bad",
                "data": {"stack": "...", "timestamp": "t"},
            },
            "TypeError",
            "bad",
            TypeError,
        ),
        # an AbstractError subclass (message inside data)
        (
            {
                "type": "ErrorFoo",
                "data": {"message": "foo failed", "timestamp": "t", "data": {}},
            },
            "ErrorFoo",
            "foo failed",
            None,
        ),
        # js-rpc's own protocol error (code, no type)
        (
            {"code": -32008, "message": "late", "data": {"timestamp": "t"}},
            "ErrorRPCTimedOut",
            "late",
            RPCTimedOut,
        ),
        # ErrorRPCTimedOut.toJSON adds the type
        (
            {"type": "ErrorRPCTimedOut", "code": -32008, "message": "late", "data": {}},
            "ErrorRPCTimedOut",
            "late",
            RPCTimedOut,
        ),
        # garbage data: falls back to the outer message
        ("just a string", "Error", "outer", None),
    ],
)
def test_from_js_shapes(data: Any, rtype: str, message: str, cls: type | None) -> None:
    remote = error_from_wire({"code": -32006, "message": "outer", "data": data})
    assert remote.remote_type == rtype
    assert remote.remote_message == message
    if cls is None:
        assert remote.error is None
    else:
        assert isinstance(remote.error, cls)
    if cls is RPCTimedOut:
        assert isinstance(remote, RPCRemoteTimedOut)
