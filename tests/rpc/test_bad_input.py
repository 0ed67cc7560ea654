"""A misbehaving peer gets its specific error; the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from polykey.rpc import (
    ErrorCode,
    JSONStreamDecoder,
    MemoryStream,
    RPCInvalidParams,
    RPCRemoteError,
    RPCServer,
    RPCStreamReset,
    StreamCode,
    UnaryHandler,
    encode_json,
    memory_stream_pair,
)

from .helpers import Harness, Unwatched, Waits, default_manifest, harness


async def read_all(peer: MemoryStream) -> tuple[list[Any], int | None]:
    """Every value the server sent until FIN, and its reset code if any."""
    decoder = JSONStreamDecoder()
    values: list[Any] = []
    try:
        while data := await peer.receive_some():
            values.extend(decoder.feed(data))
    except RPCStreamReset as exc:
        return values, exc.reset_code
    values.extend(decoder.feed_eof())
    return values, None


async def exchange(
    server: RPCServer, *chunks: bytes, eof: bool = True, unwatched: bool = False
) -> tuple[list[Any], int | None]:
    """``unwatched``: the server's end is no InputWatcher (its input is
    read by a reader task, where a memory stream's is watched)."""
    peer, server_end = memory_stream_pair()
    await server.handle_stream(Unwatched(server_end) if unwatched else server_end)
    for chunk in chunks:
        await peer.send_all(chunk)
    if eof:
        await peer.send_eof()
    result = await read_all(peer)
    await peer.aclose()
    return result


def error_code(values: list[Any]) -> tuple[int, str]:
    assert len(values) == 1, values
    (message,) = values
    assert message["id"] is None
    return message["error"]["code"], message["error"]["data"]["type"]


async def still_serving(h: Harness) -> None:
    assert (await h.client.methods.echo({"ok": 1}))["echo"] == {"ok": 1}


HEADER = b'{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":null}'


@pytest.mark.parametrize(
    ("chunks", "code", "wire_type"),
    [
        # truncated JSON, then FIN
        ([b'{"jsonrpc":"2.0","method":"echo"'], ErrorCode.PARSE_ERROR, "ErrorRPCParse"),
        # not JSON at all
        ([b"}{"], ErrorCode.PARSE_ERROR, "ErrorRPCParse"),
        ([b'{"method":"echo" "x"}'], ErrorCode.PARSE_ERROR, "ErrorRPCParse"),
        # valid JSON, not an object
        ([b"[1,2,3]"], ErrorCode.INVALID_REQUEST, "ErrorRPCInvalidRequest"),
        ([b'"echo"'], ErrorCode.INVALID_REQUEST, "ErrorRPCInvalidRequest"),
        # missing or mistyped method
        (
            [b'{"jsonrpc":"2.0","params":{}}'],
            ErrorCode.INVALID_REQUEST,
            "ErrorRPCInvalidRequest",
        ),
        (
            [b'{"jsonrpc":"2.0","method":7}'],
            ErrorCode.INVALID_REQUEST,
            "ErrorRPCInvalidRequest",
        ),
        # params not an object
        (
            [b'{"jsonrpc":"2.0","method":"echo","params":5}'],
            ErrorCode.INVALID_PARAMS,
            "ErrorRPCInvalidParams",
        ),
        # over the limit (1000 bytes here)
        (
            [b'{"method":"echo","params":{"x":"' + b"a" * 2000 + b'"}}'],
            ErrorCode.RPC_MESSAGE_LENGTH,
            "ErrorRPCMessageLength",
        ),
        # over the limit in small pieces, never complete
        (
            [b'{"method":"echo","params":{"x":"'] + [b"a" * 100] * 20,
            ErrorCode.RPC_MESSAGE_LENGTH,
            "ErrorRPCMessageLength",
        ),
    ],
)
async def test_bad_header(
    autojump_clock: trio.testing.MockClock,
    chunks: list[bytes],
    code: int,
    wire_type: str,
) -> None:
    with trio.fail_after(60):
        async with harness(max_message_size=1000) as h:
            values, reset = await exchange(h.server, *chunks)
            assert reset is None
            assert error_code(values) == (code, wire_type)
            await still_serving(h)


async def test_unknown_method_resets_with_code_1_as_js_rpc_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # js-rpc callers (Polykey's agent among them) expect a reset with code 1
    # (ErrorRPCHandlerFailed on their side), never a JSON error reply.
    with trio.fail_after(60):
        async with harness() as h:
            values, reset = await exchange(
                h.server, b'{"jsonrpc":"2.0","method":"nope","params":{}}'
            )
            assert (values, reset) == ([], StreamCode.HANDLER_FAILED)
            assert h.server.statistics().unknown_methods == 1
            await still_serving(h)


async def test_unknown_method_without_reset_gets_a_json_error() -> None:
    # A transport that cannot reset (a Unix or TCP socket) has only the JSON
    # error to say why.
    with trio.fail_after(10):
        async with RPCServer(default_manifest()) as server:
            a, b = trio.socket.socketpair()
            peer, server_end = trio.SocketStream(a), trio.SocketStream(b)
            await server.handle_stream(server_end)
            await peer.send_all(b'{"jsonrpc":"2.0","method":"nope","params":{}}')
            await peer.send_eof()
            decoder = JSONStreamDecoder()
            values: list[Any] = []
            while data := await peer.receive_some():
                values.extend(decoder.feed(data))
            await peer.aclose()
            assert error_code(values) == (
                ErrorCode.METHOD_NOT_FOUND,
                "ErrorRPCMethodNotFound",
            )


async def test_parse_error_after_header(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            header = b'{"jsonrpc":"2.0","method":"sum","params":{"x":1},"id":null}'
            values, reset = await exchange(
                h.server, header, b'{"method":"sum","params":{"x":2}}{"x":'
            )
            assert reset is None
            assert error_code(values) == (ErrorCode.PARSE_ERROR, "ErrorRPCParse")
            # a later message that is not a request is an invalid request
            values, reset = await exchange(h.server, header, b"[]")
            assert error_code(values) == (
                ErrorCode.INVALID_REQUEST,
                "ErrorRPCInvalidRequest",
            )
            await still_serving(h)


async def test_oversize_message_mid_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(max_message_size=100) as h:
            header = b'{"method":"chat","params":{"x":1}}'
            big = b'{"method":"chat","params":{"x":"' + b"y" * 200 + b'"}}'
            peer, server_end = memory_stream_pair()
            await h.server.handle_stream(server_end)
            # The first answer before the bad message (sent together, the bad
            # one may cancel the handler before it answers).
            await peer.send_all(header)
            decoder = JSONStreamDecoder()
            values: list[Any] = []
            while not values:
                values.extend(decoder.feed(await peer.receive_some()))
            assert values == [
                {"jsonrpc": "2.0", "result": {"re": {"x": 1}}, "id": None}
            ]
            await peer.send_all(big)
            await peer.send_eof()
            rest, reset = await read_all(peer)
            await peer.aclose()
            assert reset is None
            assert error_code(rest) == (
                ErrorCode.RPC_MESSAGE_LENGTH,
                "ErrorRPCMessageLength",
            )
            await still_serving(h)


@pytest.mark.parametrize("unwatched", [False, True], ids=["watched", "reader task"])
@pytest.mark.parametrize("blocks", [False, True])
async def test_bad_input_after_a_unary_header(
    autojump_clock: trio.testing.MockClock, blocks: bool, unwatched: bool
) -> None:
    """Garbage after a unary call's header: a handler that answers without
    waiting answers (extra input is ignored); one that is waiting is
    cancelled and the garbage answered, whether the stream's callback or a
    reader task reads it."""
    waits = Waits(blocks=blocks)
    manifest = default_manifest()
    manifest["waits"] = waits
    with trio.fail_after(60):
        async with harness(manifest) as h:
            header = b'{"method":"waits","params":{}}'
            values, reset = await exchange(
                h.server, header + b'{"x":]', unwatched=unwatched
            )
            assert reset is None
            if blocks:
                assert waits.cancelled.is_set()
                assert error_code(values) == (ErrorCode.PARSE_ERROR, "ErrorRPCParse")
            else:
                assert values == [
                    {"jsonrpc": "2.0", "result": {"ok": True}, "id": None}
                ]
            assert h.server.statistics().timeouts == 0
            await still_serving(h)


@pytest.mark.parametrize("unwatched", [False, True], ids=["watched", "reader task"])
async def test_bad_input_right_after_a_server_streaming_header(
    autojump_clock: trio.testing.MockClock, unwatched: bool
) -> None:
    """Garbage in the header's own chunk: read at once by a watch (before
    the handler's first step: nothing of the stream goes out), by a reader
    task once it runs (a tick may go first); either way the handler is
    cancelled and the garbage answered."""
    with trio.fail_after(60):
        async with harness() as h:
            header = b'{"method":"ticks","params":{"n":3,"every":1}}'
            values, reset = await exchange(
                h.server, header + b'{"x":]', unwatched=unwatched
            )
            assert reset is None
            if not unwatched:
                assert len(values) == 1, values
            assert error_code(values[-1:]) == (ErrorCode.PARSE_ERROR, "ErrorRPCParse")
            stats = h.server.statistics()
            assert (stats.timeouts, stats.resets, stats.internal_errors) == (0, 0, 0)
            await still_serving(h)


async def test_good_requests_byte_by_byte_with_whitespace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            data = b' \n{"jsonrpc":"2.0","method":"sum","params":{"x":1},"id":42}\r\n\t'
            data += (
                b'{"method":"sum","params":{"x":2}}  {"method":"sum","params":{"x":3}} '
            )
            values, reset = await exchange(
                h.server, *(data[i : i + 1] for i in range(len(data)))
            )
            assert reset is None
            # id 42 still gets id null back, as js-rpc does
            assert values == [{"jsonrpc": "2.0", "result": {"sum": 6}, "id": None}]


async def test_many_messages_in_one_chunk_none_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            data = b"".join(
                encode_json(
                    {"jsonrpc": "2.0", "method": "chat", "params": {"i": i}, "id": None}
                )
                for i in range(200)
            )
            values, _ = await exchange(h.server, data)
            assert [v["result"]["re"]["i"] for v in values] == list(range(200))


async def test_peer_that_never_sends_a_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(timeout=3) as h:
            peer, server_end = memory_stream_pair()
            await h.server.handle_stream(server_end)
            values, reset = await read_all(peer)
            assert (values, reset) == ([], 7)
            await peer.aclose()
            await still_serving(h)


async def test_missing_header_then_fin(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            assert await exchange(h.server, b"  ") == ([], None)
            await still_serving(h)


async def test_peer_vanishes_mid_stream(autojump_clock: trio.testing.MockClock) -> None:
    cancelled = trio.Event()

    class Slow(UnaryHandler[dict[str, Any], dict[str, Any]]):
        async def handle(self, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

    manifest = default_manifest()
    manifest["slow"] = Slow()
    with trio.fail_after(60):
        async with harness(manifest) as h:
            # client-streaming: two messages, then the peer resets
            peer, server_end = memory_stream_pair()
            await h.server.handle_stream(server_end)
            await peer.send_all(
                b'{"method":"sum","params":{"x":1}}{"method":"sum","params":{"x":2}}'
            )
            await trio.testing.wait_all_tasks_blocked()
            peer.reset(5)
            await h.settle()
            # a unary handler in progress is cancelled when its peer resets
            peer, server_end = memory_stream_pair()
            await h.server.handle_stream(server_end)
            await peer.send_all(b'{"method":"slow","params":{}}')
            await trio.sleep(1)
            peer.reset(0)
            await cancelled.wait()
            await h.settle()
            assert h.server.statistics().peer_resets == 2
            # a duplex peer that closes without FIN mid-message: truncated
            values, _ = await exchange(
                h.server, b'{"method":"chat","params":{"x":1}}{"meth'
            )
            assert values[0]["result"] == {"re": {"x": 1}}
            assert error_code(values[1:]) == (ErrorCode.PARSE_ERROR, "ErrorRPCParse")
            await still_serving(h)


async def test_invalid_params_from_parse_params(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Strict(UnaryHandler[int, dict[str, Any]]):
        def parse_params(self, params: Any) -> int:
            if not isinstance(params.get("n"), int):
                raise RPCInvalidParams("n must be an integer")
            return int(params["n"])

        async def handle(self, params: int, ctx: Any) -> dict[str, Any]:
            return {"double": params * 2}

    manifest = default_manifest()
    manifest["strict"] = Strict()
    with trio.fail_after(60):
        async with harness(manifest) as h:
            assert await h.client.unary("strict", {"n": 4}) == {"double": 8}
            with pytest.raises(RPCRemoteError) as info:
                await h.client.unary("strict", {"n": "x"})
            assert info.value.remote_code == ErrorCode.INVALID_PARAMS
            assert isinstance(info.value.error, RPCInvalidParams)
            assert info.value.remote_message == "n must be an integer"
            with pytest.raises(RPCRemoteError) as info:
                await h.client.unary("strict", 5)
            assert isinstance(info.value.error, RPCInvalidParams)


async def test_unknown_method_through_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            with pytest.raises(RPCStreamReset) as info:
                await h.client.unary("nope", {})
            assert info.value.reset_code == StreamCode.HANDLER_FAILED
            with pytest.raises(RPCStreamReset):  # noqa: PT012
                async with h.client.duplex("nope") as call:
                    await call.send({})
                    await call.receive()


async def test_server_survives_a_crowd_of_bad_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(timeout=2, max_message_size=1000) as h:
            async with trio.open_nursery() as nursery:
                for chunk in [
                    b"}",
                    b"[]",
                    b'{"x":1}',
                    b'{"method":"nope"}',
                    b"{" * 2000,
                    HEADER,
                ]:
                    for _ in range(10):
                        nursery.start_soon(exchange, h.server, chunk)
                for _ in range(10):
                    nursery.start_soon(still_serving, h)
            await h.settle()


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        # int() refuses more than 4300 digits, naming sys.set_int_max_str_digits()
        (
            b'{"method":"echo","params":{"x":' + b"1" * 100_000 + b"}}",
            "invalid JSON: number too long",
        ),
        (b"9" * 100_000, "invalid JSON: number too long"),
        # json's C scanner recurses per level: a RecursionError
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nesting too deep"),
        (
            b'{"method":"echo","params":{"x":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}}",
            "invalid JSON: nesting too deep",
        ),
        (b'{"method":"echo" "x"}', "invalid JSON: ',' was expected at character 17"),
        (b'{"method":"\xff"}', "invalid JSON: not UTF-8 text at byte 11"),
        (b'{"method":NaN}', "invalid JSON: NaN is not valid JSON"),
    ],
)
async def test_parse_errors_are_told_in_our_words(
    autojump_clock: trio.testing.MockClock, chunk: bytes, message: str
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            values, reset = await exchange(h.server, chunk)
            assert reset is None
            assert error_code(values) == (ErrorCode.PARSE_ERROR, "ErrorRPCParse")
            error = values[0]["error"]
            assert error["message"] == message
            assert error["data"]["message"] == message
            await still_serving(h)
