"""Calls in flight per connection and per server, refused at once; a
handler's bug answered -32603, and the server's own bugs, a middleware's
and a raw handler's logged with the peer and counted. Over real QUIC (and a
real Unix socket)."""

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
    QUICStreamError,
    node_tls_identity,
    node_verifier,
)
from polykey.rpc import (
    CallContext,
    ClientHandler,
    ErrorRegistry,
    ErrorResponse,
    Middleware,
    RawCall,
    RawHandler,
    Response,
    RPCClient,
    RPCRemoteError,
    RPCServer,
    RPCStreamReset,
    UnaryHandler,
    error_from_wire,
)
from polykey.rpc import error_to_wire as real_error_to_wire
from polykey.rpc import parse_request as real_parse_request

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
    #: The server's ends of ``conns``.
    served: list[QUICConnection]
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
        clients.conns, clients.served, clients.identities = [], [], identities
        for identity in identities:
            sa = await nursery.start(_client_socket)
            with trio.fail_after(10):
                conn = await QUICClient(sa, node_tls_identity(identity)).connect(
                    sb.local_address, verifier=node_verifier(b.node_id)
                )
                served = await quic.accept()
                nursery.start_soon(serve_rpc, served, server)
            clients.served.append(served)
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


async def _answer_without_fin(stream: trio.abc.HalfCloseableStream, i: int) -> None:
    """Send an echo request without our FIN, and read its answer to the
    server's FIN."""
    request = {"jsonrpc": "2.0", "method": "echo", "params": {"x": 0}, "id": i}
    await stream.send_all(json.dumps(request).encode())
    wire = b""
    while chunk := await stream.receive_some():
        wire += chunk
    assert json.loads(wire)["result"] == {"echo": 0}


@pytest.mark.parametrize("limit", ["max_calls", "max_calls_per_connection"])
async def test_calls_that_answered_and_linger_hold_no_slot(limit: str) -> None:
    # A client that vanishes after its answer never sends its FIN, and over
    # a stream that cannot drop it (a Unix socket's) the server waits for
    # it up to linger: those calls used to count as in flight, so vanished
    # clients filled max_calls and the next ones were refused
    # (bench/hardening.py's vanish churn: 676 of 2,000 refused).
    limits: dict[str, Any] = {limit: 2}
    server = RPCServer({"echo": Echo()}, timeout=10, linger=30, **limits)
    with trio.fail_after(30):
        async with server:

            def socket_pair() -> trio.SocketStream:
                ours, theirs = trio.socket.socketpair()
                assert server.handle_stream_nowait(
                    trio.SocketStream(theirs), connection="c"
                )
                return trio.SocketStream(ours)

            kept = [socket_pair() for _ in range(2)]
            for i, stream in enumerate(kept):
                await _answer_without_fin(stream, i)
            assert server.statistics().active_calls == 2  # lingering

            async def open_stream() -> trio.SocketStream:
                return socket_pair()

            client: RPCClient[Any] = RPCClient(None, open_stream, timeout=10)
            assert await client.unary("echo", {"x": 1}) == {"echo": 1}
            stats = server.statistics()
            assert stats.refused_busy == stats.refused_busy_connection == 0
            assert stats.active_calls >= 2  # the two still linger (active)
            for stream in kept:
                await stream.send_eof()
            await until(lambda: server.statistics().active_calls == 0)
            for stream in kept:
                await stream.aclose()


async def test_over_quic_an_answered_call_ends_without_the_clients_fin() -> None:
    # A QUIC stream drops the rest of the input as it comes: the call ends
    # with its answer, the client's FIN (after the answer, as js-rpc's
    # caller sends it) finds no STOP_SENDING, and once it comes quiche lets
    # the stream go.
    server = RPCServer({"echo": Echo()}, timeout=10, linger=30, max_calls=2)
    with trio.fail_after(30):
        async with server, quic_clients(server, 1) as clients:
            kept = []
            for i in range(3):
                stream = await clients.conns[0].open_stream()
                await _answer_without_fin(stream, i)
                kept.append(stream)  # its FIN not sent yet
            await until(lambda: server.statistics().active_calls == 0)
            assert server.statistics().refused_busy == 0
            served = clients.served[0]
            assert served.statistics().streams_closing == 3  # held by quiche
            for stream in kept:
                await stream.send_eof()  # a STOP_SENDING would fail this
                await stream.aclose()
            await until(lambda: served.statistics().streams_closing == 0)
            assert await clients[0].unary("echo", {"x": 1}) == {"echo": 1}
            assert server.statistics().resets == 0


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


def rpc_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "polykey.rpc"
    ]


async def raw_exchange(conn: QUICConnection, request: JSON) -> bytes:
    """What the server sends back on a stream carrying ``request``."""
    stream = await conn.open_stream()
    await stream.send_all(json.dumps(request).encode())
    await stream.send_eof()
    wire = b""
    try:
        while chunk := await stream.receive_some():
            wire += chunk
    except RPCStreamReset:
        pass
    except trio.BrokenResourceError:
        pass  # reset: what came before it is all there is
    return wire


async def test_a_bug_in_the_servers_own_code_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parse_request(value: Any) -> Any:
        # A codec step with a bug for one request.
        if (
            isinstance(value, dict)
            and value.get("method") == "echo"
            and (value.get("params") == {"x": "boom"})
        ):
            raise RuntimeError("secret internals of ours")
        return real_parse_request(value)

    monkeypatch.setattr("polykey.rpc._server.parse_request", parse_request)
    with trio.fail_after(30):
        async with (
            RPCServer({"echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            request = {"jsonrpc": "2.0", "method": "echo", "params": {"x": "boom"},
                       "id": None}  # fmt: skip
            wire = await raw_exchange(clients.conns[0], request)
            assert b"secret" not in wire
            assert b"Traceback" not in wire
            assert await client.unary("echo", {"x": 1}) == {"echo": 1}
            assert server.statistics().internal_errors == 1
    [warning] = rpc_warnings(caplog)
    assert str(identity.node_id) in warning.getMessage()
    assert "127.0.0.1" in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is RuntimeError


class Unencodable(UnaryHandler[JSON, JSON]):
    """Returns a value JSON cannot carry: the application's bug, found by our
    encoder once the handler has returned."""

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        return {"when": object()}


async def test_a_result_that_cannot_be_encoded_is_answered_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = {"unencodable": Unencodable(), "echo": Echo()}
    with trio.fail_after(30):
        async with (
            RPCServer(manifest, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            request: JSON = {"jsonrpc": "2.0", "method": "unencodable", "params": {},
                       "id": None}  # fmt: skip
            wire = await raw_exchange(clients.conns[0], request)
            reply = json.loads(wire)  # a whole reply, not a reset
            assert reply["error"]["code"] == -32603
            assert b"object" not in wire
            assert b"Traceback" not in wire
            assert await client.unary("echo", {"x": 1}) == {"echo": 1}
            assert server.statistics().handler_bugs == 1
            assert server.statistics().resets == 0
    [warning] = rpc_warnings(caplog)
    assert "'unencodable'" in warning.getMessage()
    assert str(identity.node_id) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[1] is not None
    assert isinstance(warning.exc_info[1].__cause__, TypeError)


async def test_a_bug_of_ours_writing_an_error_reply_is_answered_internal_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler raised an error meant for its caller; our code turning it
    # into the reply has a bug for that one error.
    def error_to_wire(exc: BaseException) -> Any:
        if str(exc) == "no such thing":
            raise RuntimeError("secret internals of ours")
        return real_error_to_wire(exc)

    monkeypatch.setattr("polykey.rpc._server.error_to_wire", error_to_wire)
    with trio.fail_after(30):
        async with (
            RPCServer({"refuses": Refuses(), "echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            request: JSON = {"jsonrpc": "2.0", "method": "refuses", "params": {},
                       "id": None}  # fmt: skip
            wire = await raw_exchange(clients.conns[0], request)
            reply = json.loads(wire)
            assert reply["error"]["code"] == -32603
            assert reply["error"]["message"] == "Internal error"
            assert b"secret" not in wire
            assert b"Traceback" not in wire
            # Our client raises it as a remote error; calls go on.
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("refuses", {})
            assert info.value.remote_code == -32603
            assert await client.unary("echo", {"x": 1}) == {"echo": 1}
            stats = server.statistics()
            assert (stats.internal_errors, stats.handler_bugs) == (2, 0)
            assert stats.resets == 0
    warnings = rpc_warnings(caplog)
    assert len(warnings) == 2
    assert "answered -32603" in warnings[0].getMessage()
    assert str(identity.node_id) in warnings[0].getMessage()
    assert "127.0.0.1" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert warnings[0].exc_info[0] is RuntimeError


async def test_a_bug_of_ours_after_the_answer_resets_and_is_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reply is out whole (and its FIN): nothing more can be said, so the
    # stream is reset, and the bug seen.
    async def drain(self: Any, *, in_call_scope: bool) -> None:
        raise RuntimeError("a bug of ours after the answer")

    monkeypatch.setattr("polykey.rpc._server._ServerCall._drain", drain)
    with trio.fail_after(30):
        async with (
            RPCServer({"echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            request = {"jsonrpc": "2.0", "method": "echo", "params": {"x": 2},
                       "id": None}  # fmt: skip
            wire = await raw_exchange(clients.conns[0], request)
            assert json.loads(wire)["result"] == {"echo": 2}
            assert await client.unary("echo", {"x": 3}) == {"echo": 3}
            assert server.statistics().internal_errors == 2
    warnings = rpc_warnings(caplog)
    assert len(warnings) == 2
    assert "stream reset" in warnings[0].getMessage()
    assert str(identity.node_id) in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert warnings[0].exc_info[0] is RuntimeError


class BreaksOnErrors(Middleware):
    """A middleware with a bug in its reverse hook, for error replies."""

    async def reverse(
        self, message: Response | ErrorResponse
    ) -> Response | ErrorResponse:
        if isinstance(message, ErrorResponse):
            raise KeyError("a bug in the middleware")
        return message


class Refuses(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        raise ValueError("no such thing")


async def test_a_middlewares_bug_on_an_error_reply_is_logged_and_the_error_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = {"refuses": Refuses(), "echo": Echo()}
    with trio.fail_after(30):
        async with (
            RPCServer(manifest, timeout=10, middleware=[BreaksOnErrors]) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("refuses", {})
            # The handler's own answer went out, unchanged.
            assert info.value.remote_type == "ValueError"
            assert "no such thing" in str(info.value)
            assert await client.unary("echo", {"x": 2}) == {"echo": 2}
            assert server.statistics().handler_bugs == 1
    [warning] = rpc_warnings(caplog)
    assert "middleware" in warning.getMessage()
    assert "'refuses'" in warning.getMessage()
    assert str(identity.node_id) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is KeyError


async def drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


class RawBuggy(RawHandler):
    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        stream = await call.accept({"ok": True})
        await stream.send_all(b"some")
        raise ZeroDivisionError("secret division")


async def test_a_raw_handlers_bug_after_accepting_is_logged_and_the_stream_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(30):
        async with (
            RPCServer({"raw": RawBuggy(), "echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            async with client.raw("raw", {}) as call:
                assert call.header == {"ok": True}
                with pytest.raises(QUICStreamError) as info:
                    await drain(call.stream)
            assert info.value.reset_code == 1
            assert await client.unary("echo", {"x": 3}) == {"echo": 3}
            assert server.statistics().handler_bugs == 1
    [warning] = rpc_warnings(caplog)
    assert "raw handler 'raw'" in warning.getMessage()
    assert str(identity.node_id) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is ZeroDivisionError


def test_an_error_class_that_fails_to_rebuild_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Picky(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(int(message))  # a bug: messages are text

    registry = ErrorRegistry()
    registry.register(Picky)
    error = {"code": -32006, "message": "x",
             "data": {"type": "Picky", "message": "not a number"}}  # fmt: skip
    remote = error_from_wire(error, registry, method="vaultsList")
    assert isinstance(remote, RPCRemoteError)
    assert remote.remote_type == "Picky"
    assert remote.__cause__ is None
    assert registry.rebuild_failures == 1
    [warning] = rpc_warnings(caplog)
    assert "'Picky'" in warning.getMessage()
    assert "'vaultsList'" in warning.getMessage()


class Picky(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(int(message))  # a bug: messages are text


class SaysPicky(Exception):
    """Goes out as a peer's error of type ``Picky``."""

    def rpc_error_data(self, message: str) -> dict[str, Any]:
        return {"type": "Picky", "message": message}


class RaisesPicky(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        raise SaysPicky("not a number")


async def test_the_registrys_warning_names_the_peer_the_error_came_from(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = ErrorRegistry()
    registry.register(Picky)
    with trio.fail_after(30):
        async with (
            RPCServer({"picky": RaisesPicky()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            conn = clients.conns[0]
            client: RPCClient[Any] = RPCClient(
                None, conn.open_stream, timeout=10, errors=registry,
                peer="the-seed at 127.0.0.1:1314",
            )  # fmt: skip
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("picky", {})
            assert info.value.remote_type == "Picky"
    assert registry.rebuild_failures == 1
    [warning] = rpc_warnings(caplog)
    assert "'Picky'" in warning.getMessage()
    assert "'picky'" in warning.getMessage()
    assert "the-seed at 127.0.0.1:1314" in warning.getMessage()


class FirstOnly(ClientHandler[JSON, JSON]):
    """Answers with its first input; ``parse_params`` has a bug for later
    ones."""

    def parse_params(self, params: Any) -> JSON:
        if isinstance(params, dict) and params.get("bad"):
            raise AttributeError("a bug in parse_params")
        return dict(params)

    async def handle(self, input: AsyncIterator[JSON], ctx: CallContext) -> JSON:
        async for first in input:
            return {"first": first.get("x")}
        return {}


async def test_a_bug_parsing_input_after_the_answer_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(30):
        async with (
            RPCServer({"first": FirstOnly(), "echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            stream = await clients.conns[0].open_stream()
            header = {"jsonrpc": "2.0", "method": "first", "params": {"x": 1},
                      "id": None}  # fmt: skip
            await stream.send_all(json.dumps(header).encode())
            wire = b""
            while chunk := await stream.receive_some():
                wire += chunk
            assert json.loads(wire)["result"] == {"first": 1}
            # Answered; more input, which the server reads to its FIN.
            later = {**header, "params": {"bad": True}}
            await stream.send_all(json.dumps(later).encode())
            await until(lambda: server.statistics().handler_bugs == 1)
            assert await client.unary("echo", {"x": 4}) == {"echo": 4}
    [warning] = rpc_warnings(caplog)
    assert "input of 'first'" in warning.getMessage()
    assert str(identity.node_id) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is AttributeError


class Naps(UnaryHandler[JSON, JSON]):
    """Waits a moment before it answers: its input is watched meanwhile."""

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        await trio.sleep(0.01)
        return {"napped": True}


async def test_a_bug_of_ours_watching_a_waiting_handlers_input_is_contained(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The input of a call whose handler waits is read by the QUIC stream's
    # callback, from the socket's reader or the call task's wait: a bug
    # there must reach neither. It is seen, and the call stopped, as a bug
    # in a reader task's would be.
    def input_over(self: Any, exc: Exception | None) -> None:
        raise RuntimeError("a bug of ours reading input")

    monkeypatch.setattr("polykey.rpc._server._ServerCall._input_over", input_over)
    with trio.fail_after(30):
        async with (
            RPCServer({"naps": Naps(), "echo": Echo()}, timeout=10) as server,
            quic_clients(server, 1) as clients,
        ):
            client, identity = clients[0], clients.identities[0]
            request: JSON = {"jsonrpc": "2.0", "method": "naps", "params": {},
                             "id": None}  # fmt: skip
            wire = await raw_exchange(clients.conns[0], request)
            assert b"napped" not in wire  # stopped before it answered
            assert b"Traceback" not in wire
            assert await client.unary("echo", {"x": 1}) == {"echo": 1}
            assert server.statistics().internal_errors == 1
            assert not clients.served[0].closed
    # Caught by the RPC layer: the QUIC layer's last-resort catch saw nothing.
    assert not [r for r in caplog.records if r.name.startswith("polykey.quic")]
    [warning] = rpc_warnings(caplog)
    assert "input watch" in warning.getMessage()
    assert str(identity.node_id) in warning.getMessage()
    assert warning.exc_info is not None
    assert warning.exc_info[0] is RuntimeError
