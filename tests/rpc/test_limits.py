"""Calls in flight per connection and per server, refused at once; a
handler's bug answered -32603. Over real QUIC (and a real Unix socket)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from polykey.keys import NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConnection,
    QUICServer,
    QUICSocket,
    node_tls_identity,
    node_verifier,
)
from polykey.rpc import (
    CallContext,
    RPCClient,
    RPCRemoteError,
    RPCServer,
    RPCStreamReset,
    UnaryHandler,
)

JSON = dict[str, Any]


class Hold(UnaryHandler[JSON, JSON]):
    """Answers once ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        await self.release.wait()
        return {"held": True}


class Echo(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        return {"echo": params.get("x")}


class Buggy(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        await trio.lowlevel.checkpoint()
        return {"ratio": 1 / 0}


async def serve_rpc(conn: QUICConnection, server: RPCServer) -> None:
    meta = {"node_id": conn.peer_identity, "host": conn.remote_address[0]}
    try:
        while True:
            stream = await conn.accept_stream()
            await server.handle_stream(stream, meta, connection=conn)
    except trio.BrokenResourceError:
        pass


class Clients(list[RPCClient[Any]]):
    """RPC clients, and the connections and identities under them."""

    conns: list[QUICConnection]
    identities: list[NodeIdentity]


@asynccontextmanager
async def quic_clients(server: RPCServer, count: int) -> AsyncIterator[Clients]:
    """``count`` connections from as many nodes to one serving ``server``:
    an RPC client over each."""
    b = NodeIdentity.generate()
    identities = [NodeIdentity.generate() for _ in range(count)]
    async with (
        QUICSocket("127.0.0.1") as sb,
        trio.open_nursery() as nursery,
    ):
        quic = QUICServer(sb, node_tls_identity(b), verifier=node_verifier())
        clients = Clients()
        clients.conns, clients.identities = [], identities
        for identity in identities:
            sa = await nursery.start(_client_socket)
            with trio.fail_after(10):
                conn = await QUICClient(sa, node_tls_identity(identity)).connect(
                    sb.local_address, verifier=node_verifier(b.node_id)
                )
                nursery.start_soon(serve_rpc, await quic.accept(), server)
            clients.append(RPCClient(None, conn.open_stream, timeout=10))
            clients.conns.append(conn)
        yield clients
        nursery.cancel_scope.cancel()


async def _client_socket(
    *, task_status: trio.TaskStatus[QUICSocket] = trio.TASK_STATUS_IGNORED
) -> None:
    async with QUICSocket("127.0.0.1") as sock:
        task_status.started(sock)
        await trio.sleep_forever()


async def until(check: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def hold_calls(
    nursery: trio.Nursery, client: RPCClient[Any], server: RPCServer, n: int
) -> list[JSON]:
    answers: list[JSON] = []

    async def call() -> None:
        answers.append(await client.unary("hold", {}))

    active = server.statistics().active_calls
    for _ in range(n):
        nursery.start_soon(call)
    await until(lambda: server.statistics().active_calls == active + n)
    return answers


async def test_calls_past_the_per_connection_limit_are_refused_at_once() -> None:
    hold = Hold()
    manifest = {"hold": hold, "echo": Echo()}
    with trio.fail_after(30):
        async with (
            RPCServer(manifest, timeout=10, max_calls_per_connection=2) as server,
            quic_clients(server, 2) as [busy, other],
            trio.open_nursery() as nursery,
        ):
            answers = await hold_calls(nursery, busy, server, 2)
            with trio.fail_after(2), pytest.raises(RPCStreamReset) as info:
                await busy.unary("echo", {"x": 1})
            assert info.value.reset_code == 1  # as for a method not served
            stats = server.statistics()
            assert stats.refused_busy_connection == 1
            assert stats.resets == 0  # refused before a call existed
            # Another connection is not held back.
            assert await other.unary("echo", {"x": 2}) == {"echo": 2}
            hold.release.set()
            await until(lambda: len(answers) == 2)
            assert answers == [{"held": True}] * 2
            # Its calls done, the connection calls again.
            assert await busy.unary("echo", {"x": 3}) == {"echo": 3}
            assert server.statistics().refused_busy_connection == 1


async def test_calls_past_the_servers_limit_are_refused_at_once() -> None:
    hold = Hold()
    manifest = {"hold": hold, "echo": Echo()}
    with trio.fail_after(30):
        async with (
            RPCServer(manifest, timeout=10, max_calls=2) as server,
            quic_clients(server, 2) as [first, second],
            trio.open_nursery() as nursery,
        ):
            await hold_calls(nursery, first, server, 1)
            await hold_calls(nursery, second, server, 1)
            with trio.fail_after(2), pytest.raises(RPCStreamReset) as info:
                await second.unary("echo", {"x": 1})
            assert info.value.reset_code == 1
            assert server.statistics().refused_busy == 1
            hold.release.set()
            await until(lambda: server.statistics().active_calls == 0)
            assert await second.unary("echo", {"x": 2}) == {"echo": 2}


async def test_a_unix_socket_call_past_the_limit_gets_a_json_error() -> None:
    hold = Hold()
    with trio.fail_after(30):
        async with (
            RPCServer({"hold": hold}, timeout=10, max_calls=1) as server,
            trio.open_nursery() as nursery,
        ):

            async def open_stream() -> trio.SocketStream:
                ours, theirs = trio.socket.socketpair()
                nursery.start_soon(server.serve_stream, trio.SocketStream(theirs))
                return trio.SocketStream(ours)

            client: RPCClient[Any] = RPCClient(None, open_stream, timeout=10)
            await hold_calls(nursery, client, server, 1)
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("hold", {})
            assert info.value.remote_code == -32000
            assert "too many calls in flight" in str(info.value)
            assert server.statistics().refused_busy == 1
            hold.release.set()


async def test_a_handlers_bug_answers_internal_error_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = {"buggy": Buggy(), "echo": Echo()}
    with trio.fail_after(30):
        async with (
            RPCServer(manifest, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            # What goes on the wire: the stream as the client reads it.
            stream = await clients.conns[0].open_stream()
            request: JSON = {
                "jsonrpc": "2.0",
                "method": "buggy",
                "params": {},
                "id": None,
            }
            await stream.send_all(json.dumps(request).encode())
            wire = b""
            while chunk := await stream.receive_some():
                wire += chunk
            await stream.send_eof()
            reply = json.loads(wire)
            assert reply["error"]["code"] == -32603
            assert b"ZeroDivision" not in wire
            assert b"division" not in wire
            assert b"Traceback" not in wire
            # Our client raises it as a remote error, and calls go on.
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("buggy", {})
            assert info.value.remote_code == -32603
            assert await client.unary("echo", {"x": 5}) == {"echo": 5}
            assert server.statistics().handler_bugs == 2
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "polykey.rpc"
    ]
    assert len(warnings) == 2
    assert str(identity.node_id) in warnings[0].getMessage()
    assert "127.0.0.1" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert warnings[0].exc_info[0] is ZeroDivisionError


async def test_exceptions_meant_for_the_caller_keep_their_type() -> None:
    class Refuses(UnaryHandler[JSON, JSON]):
        async def handle(self, params: JSON, ctx: CallContext) -> JSON:
            raise ValueError("no such thing")

    with trio.fail_after(30):
        async with (
            RPCServer({"refuses": Refuses()}, timeout=10) as server,
            quic_clients(server, 1) as [client],
        ):
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("refuses", {})
            assert info.value.remote_type == "ValueError"
            assert info.value.remote_code == -32006
            assert server.statistics().handler_bugs == 0
