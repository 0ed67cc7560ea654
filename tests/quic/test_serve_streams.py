"""QUICServer.serve_streams: a handler per stream, no task per connection."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from polykey.quic import (
    CloseKind,
    QUICConnection,
    QUICStream,
    QUICStreamError,
)

from .helpers import QUICPair, open_pair


async def echo(stream: QUICStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def read_to_end(stream: QUICStream) -> bytes:
    parts = []
    while data := await stream.receive_some():
        parts.append(data)
    return b"".join(parts)


async def call(conn: QUICConnection, payload: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all_and_eof(payload)
    reply = await read_to_end(stream)
    await stream.aclose()
    return reply


class Collector:
    """Streams handed over, and an event for the n-th."""

    def __init__(self) -> None:
        self.streams: list[QUICStream] = []
        self._arrived = trio.Event()

    def __call__(self, stream: QUICStream) -> None:
        self.streams.append(stream)
        self._arrived.set()

    async def wait_for(self, n: int) -> QUICStream:
        while len(self.streams) < n:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self.streams[n - 1]


async def start(
    nursery: trio.Nursery,
    pair: QUICPair,
    handler: object = echo,
) -> None:
    await nursery.start(pair.server.serve_streams, handler)


async def test_streams_of_many_connections_reach_the_handler() -> None:
    with trio.fail_after(20):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            await start(nursery, pair)
            address = pair.server_socket.local_address
            conns = [await pair.client.connect(address) for _ in range(3)]
            results: list[bytes] = []

            async def one(conn: QUICConnection, i: int) -> None:
                results.append(await call(conn, b"%d" % i * 100))

            async with trio.open_nursery() as calls:
                for i in range(12):
                    calls.start_soon(one, conns[i % 3], i)
            assert sorted(results) == sorted(b"%d" % i * 100 for i in range(12))
            # No task per connection: the accept loop and the sockets' own.
            assert pair.server.statistics.accepted == 3
            nursery.cancel_scope.cancel()


async def test_streams_that_wait_for_the_handover_are_delivered() -> None:
    # A stream that arrived before the connection was handed over (accepted
    # but not yet given a callback) goes to the callback at once.
    with trio.fail_after(10):
        async with open_pair() as pair:
            client_conn, server_conn = await pair.connect()
            cs = await client_conn.open_stream()
            await cs.send_all(b"early")
            await trio.sleep(0.2)
            got = Collector()
            server_conn.deliver_streams_to(got)
            assert len(got.streams) == 1
            assert await got.streams[0].receive_some() == b"early"
            later = await client_conn.open_stream()
            await later.send_all(b"later")
            assert await (await got.wait_for(2)).receive_some() == b"later"
            with pytest.raises(trio.BusyResourceError):
                await server_conn.accept_stream()


async def test_a_task_in_accept_stream_is_told_the_streams_go_elsewhere() -> None:
    with trio.fail_after(10):
        async with open_pair() as pair:
            client_conn, server_conn = await pair.connect()
            got = Collector()
            errors: list[BaseException] = []

            async def acceptor() -> None:
                try:
                    await server_conn.accept_stream()
                except trio.BusyResourceError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(acceptor)
                await trio.testing.wait_all_tasks_blocked()
                server_conn.deliver_streams_to(got)
            assert len(errors) == 1
            cs = await client_conn.open_stream()
            await cs.send_all(b"x")
            assert await (await got.wait_for(1)).receive_some() == b"x"


async def test_a_handler_bug_resets_its_stream_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: QUICStream) -> None:
        data = await stream.receive_some()
        if data == b"bug":
            await stream.send_all(b"half a reply")
            raise ValueError("handler bug")
        if data == b"broken":
            raise trio.BrokenResourceError("the peer's doing")
        await stream.send_all(data)

    with trio.fail_after(10):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            await start(nursery, pair, handler)
            conn = await pair.client.connect(pair.server_socket.local_address)
            with caplog.at_level(logging.WARNING, logger="polykey.quic"):
                stream = await conn.open_stream()
                await stream.send_all(b"bug")
                # Reset, not a FIN after the half reply: never read as whole.
                with pytest.raises(QUICStreamError):
                    await read_to_end(stream)
                stream = await conn.open_stream()
                await stream.send_all(b"broken")
                with pytest.raises(QUICStreamError):
                    await read_to_end(stream)
            # The connection and the server carry on.
            assert await call(conn, b"fine") == b"fine"
            second = await pair.client.connect(pair.server_socket.local_address)
            assert await call(second, b"also") == b"also"
            assert pair.server.statistics.handler_errors == 1
            bugs = [r for r in caplog.records if "stream handler failed" in r.message]
            assert len(bugs) == 1
            assert bugs[0].exc_info is not None
            assert isinstance(bugs[0].exc_info[1], ValueError)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_shutdown_closes_every_connection_and_waits_for_handlers(
    how: str,
) -> None:
    started = 0
    finished = 0
    both_started = trio.Event()

    async def handler(stream: QUICStream) -> None:
        nonlocal started, finished
        started += 1
        if started == 2:
            both_started.set()
        try:
            await stream.receive_some()
            await trio.sleep_forever()  # the stream's data was read
        finally:
            finished += 1

    async def waiting(stream: QUICStream) -> None:
        # Returns when its connection fails (aclose), else cancelled.
        nonlocal started, finished
        started += 1
        if started == 2:
            both_started.set()
        try:
            while await stream.receive_some():
                pass
        finally:
            finished += 1

    with trio.fail_after(10):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            cancel_scope = trio.CancelScope()
            returned = trio.Event()

            async def serve() -> None:
                with cancel_scope:
                    await pair.server.serve_streams(
                        handler if how == "cancel" else waiting
                    )
                returned.set()

            nursery.start_soon(serve)
            address = pair.server_socket.local_address
            conns = [await pair.client.connect(address) for _ in range(2)]
            for conn in conns:
                stream = await conn.open_stream()
                await stream.send_all(b"x")
            await both_started.wait()
            if how == "cancel":
                cancel_scope.cancel()
            else:
                await pair.server.aclose()
            await returned.wait()
            assert finished == 2
            for conn in conns:
                reason = await conn.wait_closed()
                assert reason.kind is CloseKind.PEER
                assert reason.code == 0
