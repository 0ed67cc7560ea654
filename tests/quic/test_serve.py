"""QUICServer.serve: a handler per connection; a handler's bug ends only
its own connection, never the server."""

from __future__ import annotations

import logging

import pytest
import trio

from polykey.quic import (
    CLOSE_HANDLER_FAILED,
    CloseKind,
    QUICConnection,
)

from .helpers import open_pair


async def echo_once(conn: QUICConnection) -> bytes:
    stream = await conn.accept_stream()
    data = await stream.receive_some()
    await stream.send_all_and_eof(data)
    await stream.aclose()
    return bytes(data)


async def call(conn: QUICConnection, payload: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all_and_eof(payload)
    parts = []
    while data := await stream.receive_some():
        parts.append(data)
    await stream.aclose()
    return b"".join(parts)


async def test_a_handler_bug_closes_its_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(conn: QUICConnection) -> None:
        data = await echo_once(conn)
        if data == b"bug":
            raise ValueError("handler bug")
        if data == b"broken":
            raise trio.BrokenResourceError("the peer's doing")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            await nursery.start(pair.server.serve, handler)
            address = pair.server_socket.local_address
            with caplog.at_level(logging.WARNING, logger="polykey.quic"):
                buggy = await pair.client.connect(address)
                assert await call(buggy, b"bug") == b"bug"
                reason = await buggy.wait_closed()
                broken = await pair.client.connect(address)
                assert await call(broken, b"broken") == b"broken"
                quiet = await broken.wait_closed()
            assert reason.kind is CloseKind.PEER
            assert reason.code == CLOSE_HANDLER_FAILED
            assert quiet.kind is CloseKind.PEER
            assert quiet.code == 0
            # The server carries on, for new connections too.
            fine = await pair.client.connect(address)
            assert await call(fine, b"fine") == b"fine"
            assert not fine.closed
            assert pair.server.statistics.handler_errors == 1
            bugs = [
                r for r in caplog.records if "connection handler failed" in r.message
            ]
            assert len(bugs) == 1
            assert bugs[0].exc_info is not None
            assert isinstance(bugs[0].exc_info[1], ValueError)
            nursery.cancel_scope.cancel()


async def test_cancelled_it_closes_every_connection_it_serves() -> None:
    async def handler(conn: QUICConnection) -> None:
        await echo_once(conn)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with open_pair() as pair:
            async with trio.open_nursery() as nursery:
                await nursery.start(pair.server.serve, handler)
                address = pair.server_socket.local_address
                conns = [await pair.client.connect(address) for _ in range(2)]
                for conn in conns:
                    assert await call(conn, b"x") == b"x"
                nursery.cancel_scope.cancel()
            for conn in conns:
                reason = await conn.wait_closed()
                assert reason.kind is CloseKind.PEER
                assert reason.code == 0
