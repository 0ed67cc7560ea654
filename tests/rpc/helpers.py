"""Shared handlers and an in-memory client/server harness for RPC tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

from polykey.keys import NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICServer,
    QUICSocket,
    node_tls_identity,
    node_verifier,
)
from polykey.rpc import (
    CallContext,
    ClientCaller,
    ClientHandler,
    ClientManifest,
    DuplexCaller,
    DuplexHandler,
    Handler,
    MemoryStream,
    RawCall,
    RawCaller,
    RawHandler,
    RawStream,
    RPCClient,
    RPCServer,
    ServerCaller,
    ServerHandler,
    UnaryCaller,
    UnaryHandler,
    memory_stream_pair,
)

JSON = dict[str, Any]


def strip_meta(params: JSON) -> JSON:
    return {k: v for k, v in params.items() if k != "metadata"}


class Echo(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        return {"echo": strip_meta(params), "meta": ctx.metadata}


class Count(ServerHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> AsyncIterator[JSON]:
        for i in range(params["n"]):
            if params.get("delay"):
                await trio.sleep(params["delay"])
            yield {"i": i}


class Sum(ClientHandler[JSON, JSON]):
    async def handle(self, input: AsyncIterator[JSON], ctx: CallContext) -> JSON:
        total = 0
        async for p in input:
            total += p["x"]
        return {"sum": total}


class Chat(DuplexHandler[JSON, JSON]):
    async def handle(
        self, input: AsyncIterator[JSON], ctx: CallContext
    ) -> AsyncIterator[JSON]:
        async for p in input:
            yield {"re": strip_meta(p)}


class RawEcho(RawHandler):
    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        stream = await call.accept({"hello": call.params})
        while data := await stream.receive_some():
            await stream.send_all(data.upper())
        await stream.send_eof()


class SlowRaw(RawHandler):
    """Accepts after params["delay"] seconds, then sends b"late" and FIN."""

    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        await trio.sleep(call.params["delay"])
        stream = await call.accept({"ok": True})
        await stream.send_all(b"late")
        await stream.send_eof()


class Fail(UnaryHandler[JSON, JSON]):
    """Raises ``error`` (by default one whose text must never reach the wire)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        if self.error is not None:
            raise self.error
        raise ValueError("boom in /home/someone/secret/project.py")


class Sleep(UnaryHandler[JSON, JSON]):
    """Sleeps params["s"] seconds; records whether it was cancelled."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.cancelled = 0
        self.finished = 0
        self.seen_timeout: list[float | None] = []

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        self.seen_timeout.append(ctx.timeout)
        try:
            await trio.sleep(params["s"])
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.finished += 1
        return {"slept": params["s"]}


class Waits(UnaryHandler[JSON, JSON]):
    """Answers ``{"ok": True}``: at once, or (``blocks``) once ``release``
    is set; ``entered`` and ``cancelled`` say how far it got."""

    def __init__(self, *, blocks: bool = True) -> None:
        self.blocks = blocks
        self.entered = trio.Event()
        self.release = trio.Event()
        self.cancelled = trio.Event()

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        self.entered.set()
        if self.blocks:
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled.set()
                raise
        return {"ok": True}


class PlainStream(RawStream):
    """A stream seen only through trio's stream interface, a reset and
    ``send_all_and_eof``: no EagerStream, InputDropper or InputWatcher, so
    calls over it take the ways other transports (TCP) take. A raw call's
    stream with nothing to replay forwards the interface; this adds the
    two."""

    _stream: Any

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)

    async def send_all_and_eof(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all_and_eof(data)

    def reset(self, code: int) -> None:
        self._stream.reset(code)


class Unwatched(PlainStream):
    """A memory stream without ``watch_input``: an EagerStream still, but
    no InputWatcher, so a server reads its input with a reader task."""

    @property
    def fin_received(self) -> bool:
        return self._stream.fin_received  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stream.close()

    def receive_nowait(self, max_bytes: int | None = None) -> bytes:
        return self._stream.receive_nowait(max_bytes)  # type: ignore[no-any-return]

    def send_nowait(
        self, data: bytes | bytearray | memoryview, *, eof: bool = False
    ) -> int:
        return self._stream.send_nowait(data, eof=eof)  # type: ignore[no-any-return]


class Ticks(ServerHandler[JSON, JSON]):
    """Yields n ticks, one every `every` seconds (a long server stream)."""

    async def handle(self, params: JSON, ctx: CallContext) -> AsyncIterator[JSON]:
        if params.get("keep"):
            ctx.keep_deadline()
        await trio.sleep(params.get("first", 0))
        for i in range(params["n"]):
            yield {"tick": i}
            await trio.sleep(params["every"])


class API(ClientManifest):
    echo = UnaryCaller[JSON, JSON]()
    count = ServerCaller[JSON, JSON]()
    sum = ClientCaller[JSON, JSON]()
    chat = DuplexCaller[JSON, JSON]()
    raw_echo = RawCaller("rawEcho")
    fail = UnaryCaller[JSON, JSON]()
    sleep = UnaryCaller[JSON, JSON]()
    ticks = ServerCaller[JSON, JSON]()


def default_manifest() -> dict[str, Handler[Any, Any]]:
    return {
        "echo": Echo(),
        "count": Count(),
        "sum": Sum(),
        "chat": Chat(),
        "rawEcho": RawEcho(),
        "fail": Fail(),
        "sleep": Sleep(),
        "ticks": Ticks(),
    }


class Harness:
    """An RPCServer and an RPCClient joined by in-memory streams."""

    def __init__(self, server: RPCServer, client_kwargs: Mapping[str, Any]) -> None:
        self.server = server
        self.client_ends: list[MemoryStream] = []
        self.server_ends: list[MemoryStream] = []
        self.client: RPCClient[API] = RPCClient(API, self.connect, **client_kwargs)

    async def connect(self) -> MemoryStream:
        """A stream to the server, as a QUIC connection would open one."""
        client_end, server_end = memory_stream_pair()
        self.client_ends.append(client_end)
        self.server_ends.append(server_end)
        await self.server.handle_stream(server_end, {"peer": "test"})
        return client_end

    async def settle(self) -> None:
        """Wait until the server has no call in flight."""
        with trio.fail_after(60):
            while self.server.statistics().active_calls:  # noqa: ASYNC110
                await trio.sleep(0.01)

    def assert_no_leaks(self) -> None:
        assert self.server.statistics().active_calls == 0
        for end in self.server_ends:
            assert end.closed, "server left a stream open"
        for end in self.client_ends:
            assert end.closed, "client left a stream open"


@asynccontextmanager
async def harness(
    manifest: Mapping[str, Handler[Any, Any]] | None = None,
    *,
    client_kwargs: Mapping[str, Any] | None = None,
    check_leaks: bool = True,
    **server_kwargs: Any,
) -> AsyncIterator[Harness]:
    async with RPCServer(manifest or default_manifest(), **server_kwargs) as server:
        h = Harness(server, client_kwargs or {})
        yield h
        await h.settle()
        if check_leaks:
            h.assert_no_leaks()


class QUICPair(NamedTuple):
    client: QUICConnection
    server: QUICConnection
    client_socket: QUICSocket
    server_socket: QUICSocket


@asynccontextmanager
async def quic_pair(
    *, server_config: QUICConfig | None = None
) -> AsyncIterator[QUICPair]:
    """Two nodes on loopback sockets and one connection between them, both
    ends verified: the client's end, the server's, and their sockets."""
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as sa, QUICSocket("127.0.0.1") as sb:
        server = QUICServer(
            sb, node_tls_identity(b), verifier=node_verifier(), config=server_config
        )
        with trio.fail_after(10):
            client = await QUICClient(sa, node_tls_identity(a)).connect(
                sb.local_address, verifier=node_verifier(b.node_id)
            )
            accepted = await server.accept()
        yield QUICPair(client, accepted, sa, sb)


def serve_rpc_as_a_node(conn: QUICConnection, server: RPCServer) -> None:
    """Every stream the peer opens is one call to ``server``, handed over
    from the connection's callback as a node's connection manager does (no
    task waits in ``accept_stream``)."""
    meta = {"node_id": conn.peer_identity, "host": conn.remote_address[0]}
    conn.deliver_streams_to(server.stream_callback(meta, connection=conn))


async def serve_rpc(conn: QUICConnection, server: RPCServer) -> None:
    """Every stream the peer opens is one call to ``server``."""
    meta = {"node_id": conn.peer_identity, "host": conn.remote_address[0]}
    try:
        while True:
            await server.handle_stream(await conn.accept_stream(), meta)
    except trio.BrokenResourceError:
        pass
