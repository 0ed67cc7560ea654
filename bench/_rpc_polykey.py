"""polykey RPC over polykey QUIC, peer for bench/rpc.py (run by it).

    python bench/_rpc_polykey.py server
    python bench/_rpc_polykey.py client PORT --mode unary|unary_wait|stream|first [...]

The server runs one ``RPCServer`` (default settings: timeout middleware on,
no default timeout) and hands it every stream of every connection from the
connection's callback, as a node does (``deliver_streams_to`` with
``RPCServer.stream_callback(transport_meta)``); the client makes its calls with
``RPCClient(API, stream_factory=conn.open_stream)`` over one connection.
Both present Ed25519 node certificates and verify each other.

``--mode unary_wait`` is ``unary`` with a handler that waits once before it
answers (``EchoAfterWait``): bench/rpc.py's ``wait1`` and ``wait64`` rows.

``--mode first`` is first contact, tried ``--tries`` times: each try is a
fresh node (a new identity and a new socket, no state) that dials the
server with its NodeId pinned, as a node dials a contact it has only read
about, and makes one unary call. Timed: from the dial to the reply, which
needs both sides' verification (the server hands a stream to RPC only
after it has verified the client). The server's key comes from a fixed
seed, so the client knows its NodeId without being told.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from _util import emit, emit_latencies, emit_stream, ready

from polykey.keys import KeyPair, NodeIdentity
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
    ClientManifest,
    RPCClient,
    RPCServer,
    ServerCaller,
    ServerHandler,
    UnaryCaller,
    UnaryHandler,
)

HOST = "127.0.0.1"
#: The server's key: the first-contact client pins the NodeId it gives.
SERVER_KEY = KeyPair.from_seed(b"polykey bench rpc server key 32b")
JSON = dict[str, Any]


class Echo(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        return {"i": params["i"]}


class EchoAfterWait(UnaryHandler[JSON, JSON]):
    """Echo that waits once first, as a handler doing I/O does (its input
    is watched meanwhile); bench/call_costs.py's ``wait`` rows."""

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        await trio.lowlevel.checkpoint()
        return {"i": params["i"]}


class Count(ServerHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> AsyncIterator[JSON]:
        for i in range(params["n"]):
            yield {"i": i}


class API(ClientManifest):
    echo = UnaryCaller[JSON, JSON]()
    echo_after_wait = UnaryCaller[JSON, JSON]()
    count = ServerCaller[JSON, JSON]()


async def server(args: argparse.Namespace) -> None:
    identity = NodeIdentity.generate(SERVER_KEY)

    async def stop_on_eof(scope: trio.CancelScope) -> None:
        # The driver closes our stdin to stop us.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        scope.cancel()

    with trio.CancelScope() as everything:
        async with (
            trio.open_nursery() as nursery,
            QUICSocket(HOST, 0) as sock,
            RPCServer(
                {"echo": Echo(), "echo_after_wait": EchoAfterWait(), "count": Count()}
            ) as rpc_server,
        ):
            nursery.start_soon(stop_on_eof, everything)
            quic_server = QUICServer(
                sock, node_tls_identity(identity), verifier=node_verifier()
            )

            async def handle_connection(conn: QUICConnection) -> None:
                # As a node serves (polykey.nodes' connection manager): each
                # stream the peer opens goes from the connection's callback
                # to the RPC server, no task waiting in accept_stream.
                meta = {"node_id": conn.peer_identity, "host": conn.remote_address[0]}
                ended = trio.Event()
                conn.call_when_finished(lambda _: ended.set())
                conn.deliver_streams_to(
                    rpc_server.stream_callback(meta, connection=conn)
                )
                if not conn.closed:  # else its callbacks ran already
                    await ended.wait()

            ready(sock.local_address[1])
            await quic_server.serve(handle_connection)


def datagrams(sock: QUICSocket) -> tuple[int, int]:
    return sock.statistics.datagrams_sent, sock.statistics.datagrams_received


async def unary(
    client: RPCClient[API],
    sock: QUICSocket,
    seconds: float,
    in_flight: int,
    *,
    wait: bool = False,
) -> None:
    method = client.methods.echo_after_wait if wait else client.methods.echo
    sent0, received0 = datagrams(sock)
    count = 0
    start = time.perf_counter()
    end = start + seconds

    async def worker(w: int) -> None:
        nonlocal count
        i = w
        while time.perf_counter() < end:
            out = await method({"i": i})
            if out["i"] != i:
                raise RuntimeError(f"bad echo {out!r}")
            count += 1
            i += in_flight

    async with trio.open_nursery() as nursery:
        for w in range(in_flight):
            nursery.start_soon(worker, w)
    elapsed = time.perf_counter() - start
    sent, received = datagrams(sock)
    emit(
        {
            "count": count,
            "seconds": elapsed,
            "per_s": count / elapsed,
            # UDP datagrams per call, both ways (what each call costs the
            # kernel and quiche on both sides).
            "datagrams_per_call": (sent - sent0 + received - received0) / count,
        }
    )


async def stream(client: RPCClient[API], messages: int, max_seconds: float) -> None:
    count = 0
    start = time.perf_counter()
    stop = start + max_seconds
    async with client.methods.count({"n": messages}) as results:
        async for r in results:
            if r["i"] != count:
                raise RuntimeError(f"message {count} is {r!r}")
            count += 1
            if count & 1023 == 0 and time.perf_counter() > stop:
                break
    emit_stream(count, messages, time.perf_counter() - start)


async def first_contact(port: int, tries: int) -> None:
    times = []
    server_id = SERVER_KEY.node_id
    for i in range(tries):
        # A fresh node: its key and certificate are made before it dials
        # (not timed: a node makes them once, when it is created).
        tls = node_tls_identity(NodeIdentity.generate())
        async with QUICSocket(HOST, 0) as sock:
            start = time.perf_counter()
            conn = await QUICClient(sock, tls).connect(
                (HOST, port), verifier=node_verifier(server_id)
            )
            out = await RPCClient(API, conn.open_stream).methods.echo({"i": i})
            times.append(time.perf_counter() - start)
            if out["i"] != i:
                raise RuntimeError(f"bad echo {out!r}")
            await conn.aclose()
            sock.nursery.cancel_scope.cancel()
    emit_latencies(times)


async def client_main(args: argparse.Namespace) -> None:
    if args.mode == "first":
        await first_contact(args.port, args.tries)
        return
    identity = NodeIdentity.generate()
    async with QUICSocket(HOST, 0) as sock:
        quic_client = QUICClient(
            sock, node_tls_identity(identity), verifier=node_verifier()
        )
        conn = await quic_client.connect((HOST, args.port))
        client = RPCClient(API, conn.open_stream)
        if args.mode in ("unary", "unary_wait"):
            await unary(
                client,
                sock,
                args.seconds,
                args.in_flight,
                wait=args.mode == "unary_wait",
            )
        else:
            await stream(client, args.messages, args.max_seconds)
        await conn.aclose()
        sock.nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--mode", default="unary")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--profile", help="write a cProfile of this process here")
    args = parser.parse_args()
    run = server if args.role == "server" else client_main
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
