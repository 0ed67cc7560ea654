"""polykey QUIC peer for bench/quic.py (run by it; see bench/README.md).

    python bench/_quic_polykey.py server
    python bench/_quic_polykey.py client PORT --mode bulk|rr|hs|idle [...]

Both sides present Ed25519 node certificates (``NodeIdentity.generate()``)
and verify the peer's chain with ``node_verifier()``, as Polykey nodes do;
the server uses QUICServer's defaults (stateless Retry on) but for the cap on
handshakes in flight per address, lifted: every bench client is on loopback.
It serves with ``serve_streams``, a task per stream and none per connection,
as a node serves its many idle connections.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time

import trio
from _util import echo_reply, emit, ready

from polykey.keys import NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConfig,
    QUICServer,
    QUICSocket,
    QUICStream,
    node_tls_identity,
    node_verifier,
)

HOST = "127.0.0.1"


async def handle_stream(stream: QUICStream, max_bytes: int | None) -> None:
    # serve_streams closes the stream, and ends the task quietly on
    # BrokenResourceError (the client went away).
    total = 0
    head = bytearray()
    while data := await stream.receive_some(max_bytes):
        total += len(data)
        if len(head) <= 1024:
            head += data[:1025]
    await stream.send_all_and_eof(echo_reply(total, head))


async def server(args: argparse.Namespace) -> None:
    identity = NodeIdentity.generate()
    async with QUICSocket(HOST, 0) as sock:
        quic_server = QUICServer(
            sock,
            node_tls_identity(identity),
            verifier=node_verifier(),
            # Every client of the bench dials from loopback: lift the cap
            # on handshakes in flight per address (64 at once in "idle").
            config=QUICConfig(max_handshakes_per_address=1024),
        )

        async def handle(stream: QUICStream) -> None:
            await handle_stream(stream, args.read_size)

        ready(sock.local_address[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(quic_server.serve_streams, handle)
            # The driver closes our stdin to stop us.
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()


async def read_all(stream: QUICStream) -> bytes:
    parts = []
    while data := await stream.receive_some():
        parts.append(data)
    return b"".join(parts)


async def bulk(
    client: QUICClient, addr: tuple[str, int], size: int, max_seconds: float
) -> None:
    conn = await client.connect(addr)
    stream = await conn.open_stream()
    chunk = memoryview(bytes(1024 * 1024))
    start = time.perf_counter()
    stop = start + max_seconds
    sent = 0
    while sent < size and time.perf_counter() < stop:
        n = min(len(chunk), size - sent)
        await stream.send_all(chunk[:n])
        sent += n
    await stream.send_eof()
    reply = await read_all(stream)
    seconds = time.perf_counter() - start
    if int(reply) != sent:
        raise RuntimeError(f"server got {reply!r} of {sent} bytes")
    stats = conn.statistics()
    emit(
        {
            "bytes": sent,
            "seconds": seconds,
            "mib_s": sent / seconds / 2**20,
            "capped": sent < size,
            "lost": stats.quiche.lost,
            "sent_packets": stats.quiche.sent,
        }
    )
    await conn.aclose()


async def round_trips(
    client: QUICClient, addr: tuple[str, int], seconds: float
) -> None:
    conn = await client.connect(addr)
    payload = b"\x42" * 100
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        stream = await conn.open_stream()
        await stream.send_all_and_eof(payload)  # as the other peers: data+FIN
        reply = await read_all(stream)
        await stream.aclose()
        if reply != payload:
            raise RuntimeError(f"bad echo {reply!r}")
        count += 1
    elapsed = time.perf_counter() - start
    emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})
    await conn.aclose()


async def handshakes(client: QUICClient, addr: tuple[str, int], seconds: float) -> None:
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        conn = await client.connect(addr)
        await conn.aclose()
        count += 1
    elapsed = time.perf_counter() - start
    emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})


async def idle(
    client: QUICClient,
    addr: tuple[str, int],
    target: int,
    concurrency: int,
    limit: float,
) -> None:
    conns = [await client.connect(addr)]
    print("WARM", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    failed = 0
    limiter = trio.CapacityLimiter(concurrency)
    start = time.perf_counter()

    async def one() -> None:
        nonlocal failed
        async with limiter:
            with trio.move_on_after(30):
                try:
                    conns.append(await client.connect(addr))
                    return
                except trio.BrokenResourceError:
                    pass
            failed += 1

    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for _ in range(target):
                nursery.start_soon(one)
    connected = sum(1 for c in conns[1:] if not c.closed)
    emit(
        {
            "connected": connected,
            "failed": failed,
            "seconds": time.perf_counter() - start,
        }
    )
    # Hold the connections (keep-alives flow) until the driver is done.
    await trio.to_thread.run_sync(sys.stdin.read)


async def client_main(args: argparse.Namespace) -> None:
    identity = NodeIdentity.generate()
    addr = (HOST, args.port)
    async with QUICSocket(HOST, 0) as sock:
        client = QUICClient(sock, node_tls_identity(identity), verifier=node_verifier())
        if args.mode == "bulk":
            await bulk(client, addr, args.size, args.max_seconds)
        elif args.mode == "rr":
            await round_trips(client, addr, args.seconds)
        elif args.mode == "hs":
            await handshakes(client, addr, args.seconds)
        elif args.mode == "idle":
            await idle(client, addr, args.count, args.concurrency, args.idle_limit)
        sock.nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--mode", default="bulk")
    parser.add_argument("--size", type=int, default=256 * 2**20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--idle-limit", type=float, default=240.0)
    parser.add_argument("--read-size", type=int, default=None)
    parser.add_argument("--profile", help="write a cProfile of this process here")
    args = parser.parse_args()
    run = server if args.role == "server" else client_main
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            trio.run(run, args)
        except KeyboardInterrupt:
            pass
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        try:
            trio.run(run, args)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
