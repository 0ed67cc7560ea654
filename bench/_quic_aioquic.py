"""aioquic peer for bench/quic.py (run by it; see bench/README.md).

    python bench/_quic_aioquic.py server --cert C --key K
    python bench/_quic_aioquic.py client PORT --mode bulk|rr|hs|idle [...]

aioquic's defaults, except: ALPN "quic", 1350-byte datagrams and polykey's
initial flow-control credit (10 MiB per connection, 1 MiB per stream;
aioquic does not auto-tune windows). ``serve`` without Retry (its default).
The client does not verify the server's certificate. aioquic's stream
writer has no backpressure, so the bulk sender waits while more than 4 MiB
is buffered and unacknowledged (read from aioquic's stream sender).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import time
from typing import Any

from _util import echo_reply, emit, ready
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration

HOST = "127.0.0.1"
#: The bulk sender waits while this much is buffered and not yet acked.
BACKLOG = 4 * 2**20


def configuration(*, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["quic"],
        max_datagram_size=1350,
        max_data=10 * 2**20,
        max_stream_data=2**20,
        idle_timeout=60.0,
        verify_mode=ssl.CERT_NONE,
    )


async def handle_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    total = 0
    head = bytearray()
    while data := await reader.read(65536):
        total += len(data)
        if len(head) <= 1024:
            head += data[:1025]
    writer.write(echo_reply(total, head))
    writer.write_eof()


async def server(args: argparse.Namespace) -> None:
    config = configuration(is_client=False)
    config.load_cert_chain(args.cert, args.key)
    tasks: set[asyncio.Task[None]] = set()

    def stream_handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.ensure_future(handle_stream(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    quic_server = await serve(
        HOST, 0, configuration=config, stream_handler=stream_handler
    )
    ready(quic_server._transport.get_extra_info("sockname")[1])  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    quic_server.close()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while data := await reader.read(65536):
        parts.append(data)
    return b"".join(parts)


def _sender_backlog(client: QuicConnectionProtocol, stream_id: int) -> int:
    stream: Any = client._quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return int(sender._buffer_stop - sender._buffer_start)


async def bulk(size: int, max_seconds: float, port: int) -> None:
    async with connect(HOST, port, configuration=configuration(is_client=True)) as c:
        reader, writer = await c.create_stream()
        stream_id = writer.get_extra_info("stream_id")
        chunk = bytes(2**20)
        start = time.perf_counter()
        stop = start + max_seconds
        sent = 0
        while sent < size and time.perf_counter() < stop:
            while _sender_backlog(c, stream_id) > BACKLOG:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            n = min(len(chunk), size - sent)
            writer.write(chunk[:n])
            sent += n
        writer.write_eof()
        reply = await read_all(reader)
        seconds = time.perf_counter() - start
        if int(reply) != sent:
            raise RuntimeError(f"server got {reply!r} of {sent} bytes")
        emit(
            {
                "bytes": sent,
                "seconds": seconds,
                "mib_s": sent / seconds / 2**20,
                "capped": sent < size,
            }
        )


async def round_trips(seconds: float, port: int) -> None:
    async with connect(HOST, port, configuration=configuration(is_client=True)) as c:
        payload = b"\x42" * 100
        count = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            reader, writer = await c.create_stream()
            writer.write(payload)
            writer.write_eof()
            reply = await read_all(reader)
            if reply != payload:
                raise RuntimeError(f"bad echo {reply!r}")
            count += 1
        elapsed = time.perf_counter() - start
        emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})


async def handshakes(seconds: float, port: int) -> None:
    """Sequential connects. ``connect`` returns once the handshake is done;
    its exit waits out the closing period, so that runs in the background
    (as polykey's ``aclose`` and the native client do not wait either)."""
    count = 0
    closing: set[asyncio.Task[Any]] = set()
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        cm = connect(HOST, port, configuration=configuration(is_client=True))
        await cm.__aenter__()
        task = asyncio.ensure_future(cm.__aexit__(None, None, None))
        closing.add(task)
        task.add_done_callback(closing.discard)
        count += 1
    elapsed = time.perf_counter() - start
    emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})
    if closing:
        await asyncio.wait(closing, timeout=5)


async def idle(target: int, concurrency: int, limit: float, port: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            connect(HOST, port, configuration=configuration(is_client=True))
        )
        print("WARM", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        semaphore = asyncio.Semaphore(concurrency)
        connected = 0
        failed = 0
        start = time.perf_counter()

        async def one() -> None:
            nonlocal connected, failed
            async with semaphore:
                try:
                    async with asyncio.timeout(30):
                        await stack.enter_async_context(
                            connect(
                                HOST, port, configuration=configuration(is_client=True)
                            )
                        )
                    connected += 1
                except (OSError, ConnectionError, TimeoutError):
                    failed += 1

        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*(one() for _ in range(target)))
        except TimeoutError:
            pass
        emit(
            {
                "connected": connected,
                "failed": failed,
                "seconds": time.perf_counter() - start,
            }
        )
        await loop.run_in_executor(None, sys.stdin.read)


async def client_main(args: argparse.Namespace) -> None:
    if args.mode == "bulk":
        await bulk(args.size, args.max_seconds, args.port)
    elif args.mode == "rr":
        await round_trips(args.seconds, args.port)
    elif args.mode == "hs":
        await handshakes(args.seconds, args.port)
    elif args.mode == "idle":
        await idle(args.count, args.concurrency, args.idle_limit, args.port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--mode", default="bulk")
    parser.add_argument("--size", type=int, default=256 * 2**20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--idle-limit", type=float, default=240.0)
    args = parser.parse_args()
    try:
        asyncio.run(server(args) if args.role == "server" else client_main(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
