"""A bug in one connection's callback, input or verifier is logged at
WARNING with the peer, counted in ``unexpected_errors``, and never ends the
socket: the socket's other connections (and new ones) carry on. The bugs
are injected; everything runs over real sockets on loopback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from polykey.keys import NodeId, NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICConnectionError,
    QUICServer,
    QUICSocket,
    node_tls_identity,
    node_verifier,
)

from .helpers import QUICPair, open_pair


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "polykey.quic" and r.levelno == logging.WARNING
    ]


def bug_in(
    monkeypatch: pytest.MonkeyPatch, method: str, conn: QUICConnection, bug: Exception
) -> None:
    """``QUICConnection.<method>`` raises ``bug`` for ``conn`` only: patched
    on the class (a QUICConnection has slots), the others are unharmed."""
    real = getattr(QUICConnection, method)

    def buggy(self: QUICConnection, *args: Any, **kwargs: Any) -> Any:
        if self is conn:
            raise bug
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QUICConnection, method, buggy)


def where(conn: QUICConnection) -> str:
    host, port = conn.local_address[:2]
    return f"{host}:{port}"


async def until_counted(sock: QUICSocket, n: int) -> None:
    with trio.fail_after(5):
        while sock.statistics.unexpected_errors < n:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def round_trip(client_conn: QUICConnection, server_conn: QUICConnection) -> None:
    with trio.fail_after(5):
        stream = await client_conn.open_stream()
        await stream.send_all(b"ping")
        theirs = await server_conn.accept_stream()
        assert await theirs.receive_some(4) == b"ping"
        await theirs.send_all(b"pong")
        assert await stream.receive_some(4) == b"pong"


async def still_serves(
    pair: QUICPair, *conns: tuple[QUICConnection, QUICConnection]
) -> None:
    """A stream round trip on each (client, server) pair of ``conns``, and on
    a new connection."""
    for client_conn, server_conn in [*conns, await pair.connect()]:
        await round_trip(client_conn, server_conn)


async def test_a_datagram_handler_that_raises_does_not_end_the_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = QUICConfig(datagram_queue=64)
    async with open_pair(config) as pair:
        client_conn, server_conn = await pair.connect()
        got: list[bytes] = []

        def handler(payload: bytes) -> None:
            if payload == b"bad":
                raise KeyError("a bug in the application's datagram handler")
            got.append(payload)

        server_conn.on_datagram(handler)
        assert client_conn.send_datagram(b"bad")
        # The connection lives on, datagrams and streams alike (before, the
        # handler's exception ended the socket's reader, and the socket).
        await trio.sleep(0.1)
        assert client_conn.send_datagram(b"good")
        with trio.fail_after(5):
            while not got:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert got == [b"good"]
        assert not server_conn.closed
        await still_serves(pair, (client_conn, server_conn))
    [warning] = warnings(caplog)
    assert "DATAGRAM handler" in warning.getMessage()
    assert where(client_conn) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is KeyError
    assert pair.server_socket.statistics.unexpected_errors == 1


async def test_a_finished_callback_that_raises_does_not_end_the_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_pair() as pair:
        client_conn, server_conn = await pair.connect()
        after: list[QUICConnection] = []

        def broken(conn: QUICConnection) -> None:
            raise RuntimeError("a bug in the bookkeeping")

        server_conn.call_when_finished(broken)
        server_conn.call_when_finished(after.append)  # still called
        await client_conn.aclose()
        await until_counted(pair.server_socket, 1)
        assert after == [server_conn]
        await still_serves(pair)
    [warning] = warnings(caplog)
    assert "finished callback" in warning.getMessage()
    assert "broken" in warning.getMessage()
    assert where(client_conn) in warning.getMessage()


async def test_a_bug_in_one_connections_input_closes_that_one_only(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_pair() as pair:
        client_conn, server_conn = await pair.connect()
        other_client, other_server = await pair.connect()
        bug = AssertionError("a bug of ours in stream delivery")
        bug_in(monkeypatch, "_deliver_streams", server_conn, bug)
        stream = await client_conn.open_stream()
        await stream.send_all(b"x")
        with trio.fail_after(5):
            reason = await server_conn.wait_closed()
        assert (reason.is_app, reason.code) == (False, 0x1)  # INTERNAL_ERROR
        with trio.fail_after(5):
            await client_conn.wait_closed()
        await still_serves(pair, (other_client, other_server))
    [warning] = warnings(caplog)
    assert "processing its input" in warning.getMessage()
    assert where(client_conn) in warning.getMessage()
    assert pair.server_socket.statistics.unexpected_errors == 1


class _Flaky:
    """A verifier with a bug the first time, then Polykey's."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = node_verifier()

    def __call__(self, chain: Sequence[bytes]) -> NodeId:
        self.calls += 1
        if self.calls == 1:
            raise IndexError("a bug in the verifier")
        return self.real(chain)


async def test_a_verifier_that_raises_refuses_that_peer_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        server = QUICServer(ss, node_tls_identity(server_id), verifier=_Flaky())
        client = QUICClient(cs, node_tls_identity(client_id))
        with trio.fail_after(10):
            refused = await client.connect(ss.local_address)
            # The server refused it once verified (the client's side of the
            # handshake was done first).
            await refused.wait_closed()
            with pytest.raises(QUICConnectionError):
                refused.raise_if_dead()
            # Nothing of the bug on the wire, in the close reason.
            assert refused.close_reason is not None
            assert refused.close_reason.reason == b"the verifier failed"
            conn = await client.connect(ss.local_address)
            accepted = await server.accept()
        assert accepted.peer_identity == client_id.node_id
        assert not conn.closed
        assert ss.statistics.unexpected_errors == 1
    [warning] = warnings(caplog)
    assert "peer verifier" in warning.getMessage()
    assert f"{cs.local_address[0]}:{cs.local_address[1]}" in warning.getMessage()


async def test_a_bug_in_one_connections_timer_closes_that_one_only(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep-alives make the connection's timer fire soon.
    async with open_pair(server_config=QUICConfig(keep_alive_interval=0.2)) as pair:
        client_conn, server_conn = await pair.connect()
        other = await pair.connect()
        bug_in(monkeypatch, "_on_timer", server_conn, ZeroDivisionError("a bug of ours in the timer"))
        with trio.fail_after(5):
            reason = await server_conn.wait_closed()
        assert (reason.is_app, reason.code) == (False, 0x1)
        await still_serves(pair, other)
    [warning] = warnings(caplog)
    assert "its timer" in warning.getMessage()
    assert where(client_conn) in warning.getMessage()


async def test_a_bug_handling_an_initial_does_not_end_the_socket(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_pair() as pair:
        real = pair.server.handle_initial
        calls = 0

        def handle_initial(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise IndexError("a bug of ours parsing a token")
            real(*args)

        monkeypatch.setattr(pair.server, "handle_initial", handle_initial)
        # The client's Initial is lost to the bug; its retransmission gets in.
        client_conn, server_conn = await pair.connect()
        await round_trip(client_conn, server_conn)
        assert pair.server_socket.statistics.unexpected_errors == 1
    [warning] = warnings(caplog)
    assert "Initial" in warning.getMessage()
    assert where(client_conn) in warning.getMessage()
