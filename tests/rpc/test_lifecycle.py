"""How calls end on the fast paths: FINs, lingering, handlers that wait."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest
import trio
import trio.testing

from polykey.rpc import (
    ErrorCode,
    JSONStreamDecoder,
    MemoryStream,
    RPCClient,
    RPCRemoteError,
    RPCTimedOut,
    ServerHandler,
    UnaryHandler,
    encode_json,
    memory_stream_pair,
)

from .helpers import API, default_manifest, harness

JSON = dict[str, Any]


async def read_values(peer: MemoryStream, n: int) -> list[Any]:
    decoder = JSONStreamDecoder()
    values: list[Any] = []
    while len(values) < n:
        values.extend(decoder.feed(await peer.receive_some()))
    return values


class FakeServer:
    """A server end that answers the first request and never sends FIN."""

    def __init__(self) -> None:
        self.ends: list[MemoryStream] = []

    async def serve(self, end: MemoryStream) -> None:
        (request,) = await read_values(end, 1)
        await end.send_all(
            encode_json({"jsonrpc": "2.0", "result": request["params"], "id": None})
        )


@pytest.mark.parametrize("keep", [False, True])
async def test_unary_without_the_servers_fin(
    autojump_clock: trio.testing.MockClock, keep: bool
) -> None:
    """The result is returned after ``linger``, the stream reset with code
    0 (after our FIN); a kept deadline shorter than linger still times the
    call out (code 7)."""
    fake = FakeServer()
    async with trio.open_nursery() as nursery:

        async def connect() -> MemoryStream:
            ours, theirs = memory_stream_pair()
            fake.ends.append(theirs)
            nursery.start_soon(fake.serve, theirs)
            return ours

        client: RPCClient[API] = RPCClient(API, connect, linger=3)
        start = trio.current_time()
        if keep:
            with pytest.raises(RPCTimedOut):
                await client.methods.echo({"a": 1}, rpc_timeout=1, keep_deadline=True)
            assert trio.current_time() - start == pytest.approx(1)
            assert fake.ends[-1].stop_received == 7
        else:
            out = await client.methods.echo({"a": 1}, rpc_timeout=10)
            assert out["a"] == 1
            assert trio.current_time() - start == pytest.approx(3)
            assert fake.ends[-1].stop_received == 0
        # our FIN went before the reset
        assert await fake.ends[-1].receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_server_lingers_for_the_clients_fin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After answering, the server waits ``linger`` for the client's FIN,
    then closes; no timeout is counted."""
    async with harness(linger=2) as h:
        peer, server_end = memory_stream_pair()
        await h.server.handle_stream(server_end)
        await peer.send_all(b'{"method":"echo","params":{"a":1}}')
        (value,) = await read_values(peer, 1)
        assert value["result"]["echo"] == {"a": 1}
        assert await peer.receive_some() == b""  # the server's FIN
        start = trio.current_time()
        await h.settle()
        assert trio.current_time() - start == pytest.approx(2, abs=0.05)
        assert h.server.statistics().timeouts == 0
        assert server_end.closed
        await peer.aclose()
        # With the FIN the call ends at once, gracefully.
        peer, server_end = memory_stream_pair()
        await h.server.handle_stream(server_end)
        await peer.send_all(b'{"method":"echo","params":{"a":2}}')
        await peer.send_eof()
        (value,) = await read_values(peer, 1)
        assert await peer.receive_some() == b""
        await h.settle()
        assert trio.current_time() - start == pytest.approx(2, abs=0.05)
        assert peer.stop_received == 0
        assert server_end.reset_received is None


class WaitsThen(UnaryHandler[JSON, JSON]):
    """Waits (params["s"] seconds, or one checkpoint), then answers or raises."""

    async def handle(self, params: JSON, ctx: Any) -> JSON:
        if params.get("s") is None:
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep(params["s"])
        if params.get("fail"):
            raise KeyError("after waiting")
        return {"waited": params.get("s")}


async def test_unary_handlers_that_wait(autojump_clock: trio.testing.MockClock) -> None:
    manifest = default_manifest()
    manifest["waits"] = WaitsThen()
    async with harness(manifest, timeout=5) as h:
        assert await h.client.unary("waits", {}) == {"waited": None}
        assert await h.client.unary("waits", {"s": 1}) == {"waited": 1}
        with pytest.raises(RPCRemoteError) as info:
            await h.client.unary("waits", {"s": 1, "fail": True})
        assert isinstance(info.value.error, KeyError)
        with pytest.raises(RPCTimedOut):
            await h.client.unary("waits", {"s": 10})
        # many at once, each with its own reader
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(h.client.unary, "waits", {"s": i % 3})
        await h.settle()
        stats = h.server.statistics()
        assert stats.timeouts == 1
        assert stats.internal_errors == 0


class Big(ServerHandler[JSON, JSON]):
    """Yields one message of params["size"] bytes, then waits."""

    async def handle(self, params: JSON, ctx: Any) -> AsyncIterator[JSON]:
        yield {"blob": "x" * params["size"]}
        await trio.sleep_forever()


async def test_bad_input_never_cuts_a_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Garbage arriving while a large message waits for flow control: the
    message still goes out whole, then the error answer."""
    manifest = default_manifest()
    manifest["big"] = Big()
    async with harness(manifest) as h:
        peer, server_end = memory_stream_pair()  # 64 KiB each way
        await h.server.handle_stream(server_end)
        await peer.send_all(b'{"method":"big","params":{"size":300000}}')
        await trio.testing.wait_all_tasks_blocked()  # the send is stuck
        await peer.send_all(b"][")
        await trio.testing.wait_all_tasks_blocked()
        decoder = JSONStreamDecoder()
        values: list[Any] = []
        while data := await peer.receive_some():
            values.extend(decoder.feed(data))
        await peer.aclose()
        assert len(values) == 2
        assert len(values[0]["result"]["blob"]) == 300_000
        assert values[1]["error"]["code"] == ErrorCode.PARSE_ERROR


class NotACoroutine(UnaryHandler[JSON, JSON]):
    """``handle`` returns an awaitable that is not a coroutine."""

    def handle(self, params: JSON, ctx: Any) -> Any:
        class Later:
            def __await__(self) -> Generator[Any, None, JSON]:
                yield from trio.sleep(1).__await__()  # noqa: ASYNC105
                return {"later": params["x"]}

        return Later()


async def test_unary_handler_returning_another_awaitable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manifest = default_manifest()
    manifest["later"] = NotACoroutine()
    async with harness(manifest) as h:
        assert await h.client.unary("later", {"x": 3}) == {"later": 3}


class RecordingStream(MemoryStream):
    """Records what went out with its FIN in one write (``send_all_and_eof``,
    or ``send_nowait`` with ``eof`` that took it all)."""

    finals: list[bytes]

    async def send_all_and_eof(self, data: bytes | bytearray | memoryview) -> None:
        self.finals.append(bytes(data))
        await super().send_all_and_eof(data)

    def send_nowait(
        self, data: bytes | bytearray | memoryview, *, eof: bool = False
    ) -> int:
        taken = super().send_nowait(data, eof=eof)
        if eof and taken == len(data):
            self.finals.append(bytes(data))
        return taken


def recording_pair() -> tuple[RecordingStream, RecordingStream]:
    a, b = memory_stream_pair()
    ends = []
    for end in (a, b):
        end.__class__ = RecordingStream
        assert isinstance(end, RecordingStream)
        end.finals = []
        ends.append(end)
    return ends[0], ends[1]


async def test_last_message_goes_with_the_fin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A unary or client-streaming reply and a server-streaming request end
    their stream in one write (one QUIC packet, not two); a unary request
    does not: until the answer comes, a reset must still reach the handler."""
    ends: list[tuple[RecordingStream, RecordingStream]] = []
    with trio.fail_after(60):
        async with harness() as h:

            async def connect() -> MemoryStream:
                client_end, server_end = recording_pair()
                ends.append((client_end, server_end))
                h.client_ends.append(client_end)
                h.server_ends.append(server_end)
                await h.server.handle_stream(server_end, {})
                return client_end

            client: RPCClient[API] = RPCClient(API, connect)
            echoed = await client.methods.echo({"a": 1})
            assert echoed["echo"] == {"a": 1}
            async with client.methods.sum() as call:
                await call.send({"x": 2})
                await call.send({"x": 3})
                assert await call.finish() == {"sum": 5}
            async with client.methods.count({"n": 2}) as stream:
                assert [m async for m in stream] == [{"i": 0}, {"i": 1}]
            await h.settle()
    (echo_c, echo_s), (sum_c, sum_s), (count_c, count_s) = ends
    decode = JSONStreamDecoder().feed
    assert echo_c.finals == []
    assert [v["result"] for v in decode(b"".join(echo_s.finals))] == [echoed]
    assert sum_c.finals == []
    assert [v["result"] for v in decode(b"".join(sum_s.finals))] == [{"sum": 5}]
    assert [v["method"] for v in decode(b"".join(count_c.finals))] == ["count"]
    assert count_s.finals == []
