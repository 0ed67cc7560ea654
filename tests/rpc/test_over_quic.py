"""RPC end to end over real QUIC streams on loopback (real clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from polykey.quic import (
    QUICConfig,
    QUICConnection,
    QUICConnectionError,
    QUICStream,
)
from polykey.rpc import (
    ErrorCode,
    JSONStreamDecoder,
    RPCClient,
    RPCRemoteError,
    RPCServer,
    RPCTimedOut,
)
from polykey.testing import SchedulerCounter

from .helpers import (
    API,
    PlainStream,
    Waits,
    default_manifest,
    quic_pair,
    serve_rpc,
)


async def settled(server: RPCServer) -> None:
    """Every call on the server has finished (each ends once both FINs
    crossed, just after the client has its answer)."""
    with trio.fail_after(10):
        while server.statistics().active_calls:  # noqa: ASYNC110
            await trio.sleep(0.01)


@asynccontextmanager
async def quic_rpc() -> AsyncIterator[tuple[RPCClient[API], RPCClient[API], RPCServer]]:
    """Two nodes, one connection, an RPC server on each side: yields the
    client's RPC client, the server's RPC client (calling back over the same
    connection) and the server's RPC server."""
    async with (
        quic_pair() as (conn_a, conn_b, _, _),
        RPCServer(default_manifest(), timeout=10) as rpc_a,
        RPCServer(default_manifest(), timeout=10) as rpc_b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve_rpc, conn_a, rpc_a)
        nursery.start_soon(serve_rpc, conn_b, rpc_b)
        yield (
            RPCClient(API, conn_a.open_stream),
            RPCClient(API, conn_b.open_stream),
            rpc_b,
        )
        nursery.cancel_scope.cancel()


async def test_every_call_type_over_one_connection() -> None:
    async with quic_rpc() as (client, _, _):
        api = client.methods
        with trio.fail_after(10):
            assert (await api.echo({"x": 1}))["echo"] == {"x": 1}
            async with api.count({"n": 5}) as results:
                assert [r["i"] async for r in results] == [0, 1, 2, 3, 4]
            async with api.sum() as call:
                for x in range(10):
                    await call.send({"x": x})
                assert await call.finish() == {"sum": 45}
            async with api.chat() as chat:
                await chat.send({"m": "hi"})
                assert await chat.receive() == {"re": {"m": "hi"}}
                await chat.send_eof()
                assert [r async for r in chat] == []
            async with api.raw_echo({"a": 1}) as raw:
                assert raw.header["hello"]["a"] == 1
                await raw.stream.send_all(b"quic")
                await raw.stream.send_eof()
                assert await raw.stream.receive_some() == b"QUIC"
            with pytest.raises(RPCRemoteError, match="boom"):
                await api.fail({})


async def test_many_concurrent_calls() -> None:
    async with quic_rpc() as (client, _, server):
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append((await client.methods.echo({"i": i}))["echo"]["i"])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
        assert sorted(results) == list(range(500))
        await settled(server)


async def test_rpc_both_ways_on_one_connection() -> None:
    async with quic_rpc() as (from_a, from_b, _):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_a.methods.echo, {"dir": "a->b"})
                nursery.start_soon(from_b.methods.echo, {"dir": "b->a"})
            assert (await from_b.methods.echo({"x": 2}))["echo"] == {"x": 2}


async def test_timeout_resets_the_quic_stream_and_cancels_the_handler() -> None:
    async with quic_rpc() as (client, _, server):
        with trio.fail_after(10), pytest.raises(RPCTimedOut):
            await client.methods.sleep({"s": 30}, rpc_timeout=0.3)
        await settled(server)
        assert (await client.methods.echo({"after": True}))["echo"] == {"after": True}


async def test_eager_and_plain_streams_end_calls_alike() -> None:
    """A call over an EagerStream (QUIC's) ends without the reads and
    checkpoints a plain stream needs once the answer and the server's FIN
    are in; both ways must end every call type the same for both ends:
    the same answers, the same server statistics (no reset, no timeout),
    every stream closed on both connections. And the eager way is taken:
    the calls cost fewer task steps (the request read and written, and the
    unary reply written, without a checkpoint of their own)."""
    plain = False

    def wrap(stream: QUICStream) -> trio.abc.HalfCloseableStream:
        return PlainStream(stream) if plain else stream

    async def serve(conn: QUICConnection, rpc: RPCServer) -> None:
        while True:
            await rpc.handle_stream(wrap(await conn.accept_stream()))

    async with (
        quic_pair() as (conn_a, conn_b, _, _),
        RPCServer(default_manifest(), timeout=10) as rpc,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve, conn_b, rpc)

        async def open_stream() -> trio.abc.HalfCloseableStream:
            return wrap(await conn_a.open_stream())

        api = RPCClient(API, open_stream).methods

        async def calls() -> tuple[list[Any], dict[str, Any], int]:
            before = rpc.statistics()
            answers: list[Any] = []
            with trio.fail_after(20):
                with SchedulerCounter() as counter:
                    for i in range(20):
                        answers.append((await api.echo({"i": i}))["echo"])
                    # Handlers that wait: their input is watched by the
                    # stream's callback over QUIC, by a reader task else.
                    for i in range(5):
                        answers.append(await api.sleep({"s": 0, "i": i}))
                async with api.count({"n": 3}) as results:
                    answers.append([r async for r in results])
                async with api.sum() as call:
                    for x in range(3):
                        await call.send({"x": x})
                    answers.append(await call.finish())
                async with api.chat() as chat:
                    await chat.send({"m": "hi"})
                    answers.append(await chat.receive())
                    await chat.send_eof()
                    answers.append([r async for r in chat])
                with pytest.raises(RPCRemoteError) as failed:
                    await api.fail({})
                answers.append(failed.value.message)
                await settled(rpc)
                while conn_a.statistics().streams_open:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                while conn_b.statistics().streams_open:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            after = rpc.statistics()
            delta = {
                name: getattr(after, name) - getattr(before, name)
                for name in (
                    "calls", "timeouts", "error_responses", "resets",
                    "peer_resets", "internal_errors", "handler_bugs",
                )
            }  # fmt: skip
            return answers, delta, counter.steps

        eager_answers, eager_stats, eager_steps = await calls()
        plain = True
        plain_answers, plain_stats, plain_steps = await calls()
        nursery.cancel_scope.cancel()
    assert eager_answers == plain_answers
    assert eager_stats == plain_stats
    assert eager_stats["calls"] == 29
    assert eager_stats["resets"] == eager_stats["peer_resets"] == 0
    assert eager_stats["timeouts"] == 0
    # 20 unary calls: for each, three task steps less for the caller
    # (send_all of the request in the step that opened the stream, send_eof,
    # aclose), three or four for the server's (its request read and its
    # reply written in its first step, aclose): about 140 measured, 76-80
    # before the nowait reads and writes.
    assert eager_steps + 100 <= plain_steps, (eager_steps, plain_steps)


async def test_unary_calls_past_the_stream_limit_wait_for_credit() -> None:
    """A unary call opens its stream without waiting when it can
    (QUICConnection.open_stream_nowait, found by RPCClient through the bound
    open_stream); at the peer's stream limit that raises WouldBlock, and
    the call waits for credit through open_stream instead."""
    async with (
        quic_pair(server_config=QUICConfig(initial_max_streams_bidi=2)) as (
            conn,
            accepted,
            _,
            _,
        ),
        RPCServer(default_manifest(), timeout=10) as rpc,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve_rpc, accepted, rpc)
        api = RPCClient(API, conn.open_stream).methods
        answers: list[Any] = []
        refused = 0

        async def call(i: int) -> None:
            answers.append(await api.sleep({"s": 0.05, "i": i}))

        with trio.fail_after(20):
            async with trio.open_nursery() as calls:
                for i in range(8):
                    calls.start_soon(call, i)
                await trio.sleep(0.02)
                # Two calls hold the only two streams; six wait for credit.
                try:
                    conn.open_stream_nowait()
                except trio.WouldBlock:
                    refused += 1
        assert refused == 1
        assert len(answers) == 8
        # A caller already cancelled opens no stream (the checkpoint before
        # the open that does not wait).
        with trio.fail_after(5):
            while not conn.quiche.peer_streams_left_bidi():  # noqa: ASYNC110
                await trio.sleep(0.01)  # the credit of the calls' streams
        left = conn.quiche.peer_streams_left_bidi()
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await api.sleep({"s": 0, "i": 8})
        assert cancelled.cancelled_caught
        assert conn.quiche.peer_streams_left_bidi() == left
        nursery.cancel_scope.cancel()
    with pytest.raises(QUICConnectionError):  # the socket closed it
        conn.open_stream_nowait()


@pytest.mark.parametrize("plain", [False, True], ids=["watched", "reader task"])
@pytest.mark.parametrize("then", ["garbage", "reset", "fin"])
async def test_a_waiting_handler_learns_of_its_callers_input(
    plain: bool, then: str
) -> None:
    """While a unary handler waits, the caller's input is watched: over a
    QUIC stream by the stream's callback, over a plain stream by a reader
    task, to the same end. Garbage after the request cancels the handler
    and is answered with a parse error; a reset cancels it; the FIN lets
    it answer, and the call ends gracefully."""
    waits = Waits()
    entered, release, cancelled = waits.entered, waits.release, waits.cancelled
    manifest = default_manifest()
    manifest["waits"] = waits
    async with (
        quic_pair() as (conn, accepted, _, _),
        RPCServer(manifest, timeout=10) as rpc,
    ):

        def opened(stream: QUICStream) -> None:
            assert rpc.handle_stream_nowait(PlainStream(stream) if plain else stream)

        accepted.deliver_streams_to(opened)
        with trio.fail_after(10):
            cs = await conn.open_stream()
            await cs.send_all(b'{"jsonrpc":"2.0","method":"waits","params":{}}')
            await entered.wait()
            if then == "garbage":
                await cs.send_all(b'{"x":]')
                await cancelled.wait()
            elif then == "reset":
                cs.reset(5)
                await cancelled.wait()
            else:
                await cs.send_eof()
                await trio.sleep(0.05)  # the FIN is in before the answer
                release.set()
            if then != "reset":
                decoder = JSONStreamDecoder()
                values: list[Any] = []
                while data := await cs.receive_some():
                    values.extend(decoder.feed(data))
                values.extend(decoder.feed_eof())
                await cs.aclose()
            await settled(rpc)
        stats = rpc.statistics()
        if then == "garbage":
            assert [v["error"]["code"] for v in values] == [ErrorCode.PARSE_ERROR]
        elif then == "fin":
            assert values == [{"jsonrpc": "2.0", "result": {"ok": True}, "id": None}]
            assert not cancelled.is_set()
        assert stats.peer_resets == (1 if then == "reset" else 0)
        assert stats.resets == stats.timeouts == stats.internal_errors == 0
        with trio.fail_after(5):
            while accepted.statistics().streams_open:  # noqa: ASYNC110
                await trio.sleep(0.01)
