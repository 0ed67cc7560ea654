"""grpcio (grpc.aio) peer for bench/rpc.py (run by it).

    python bench/_rpc_grpc.py server --cert C --key K
    python bench/_rpc_grpc.py client PORT --cert C --mode unary|unary_wait|stream|first [...]

No protoc: generic handlers (``grpc.method_handlers_generic_handler``) whose
messages are the same JSON objects polykey's RPC carries, serialised with
``json`` (as an RPC layer must). HTTP/2 over TLS (the self-signed ECDSA
certificate), one channel, so the wire is encrypted as QUIC's is.
``--mode first`` opens a new channel per try (TCP and TLS handshakes, the
server verified by the client only: no client certificate) for one call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from _util import emit, emit_latencies, emit_stream, ready

HOST = "127.0.0.1"
SERVICE = "bench.Bench"
JSON = dict[str, Any]


def dumps(obj: JSON) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


loads = json.loads


async def echo(request: JSON, context: grpc.aio.ServicerContext) -> JSON:
    return {"i": request["i"]}


async def echo_after_wait(request: JSON, context: grpc.aio.ServicerContext) -> JSON:
    """Echo that waits once first (one pass of the event loop), as the
    polykey peer's EchoAfterWait does: bench/rpc.py's ``wait`` rows."""
    await asyncio.sleep(0)
    return {"i": request["i"]}


async def count(
    request: JSON, context: grpc.aio.ServicerContext
) -> AsyncIterator[JSON]:
    for i in range(request["n"]):
        yield {"i": i}


async def server(args: argparse.Namespace) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=loads, response_serializer=dumps
            ),
            "EchoAfterWait": grpc.unary_unary_rpc_method_handler(
                echo_after_wait, request_deserializer=loads, response_serializer=dumps
            ),
            "Count": grpc.unary_stream_rpc_method_handler(
                count, request_deserializer=loads, response_serializer=dumps
            ),
        },
    )
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(args.key_pem, args.cert_pem)])
    port = grpc_server.add_secure_port(f"{HOST}:0", creds)
    await grpc_server.start()
    ready(port)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await grpc_server.stop(0)


async def unary(
    channel: grpc.aio.Channel, seconds: float, in_flight: int, method: str = "Echo"
) -> None:
    call = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=dumps, response_deserializer=loads
    )
    count = 0
    start = time.perf_counter()
    end = start + seconds

    async def worker(w: int) -> None:
        nonlocal count
        i = w
        while time.perf_counter() < end:
            out = await call({"i": i})
            if out["i"] != i:
                raise RuntimeError(f"bad echo {out!r}")
            count += 1
            i += in_flight

    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    elapsed = time.perf_counter() - start
    emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})


async def stream(channel: grpc.aio.Channel, messages: int, max_seconds: float) -> None:
    call = channel.unary_stream(
        f"/{SERVICE}/Count", request_serializer=dumps, response_deserializer=loads
    )
    count = 0
    start = time.perf_counter()
    stop = start + max_seconds
    responses = call({"n": messages})
    async for r in responses:
        if r["i"] != count:
            raise RuntimeError(f"message {count} is {r!r}")
        count += 1
        if count & 1023 == 0 and time.perf_counter() > stop:
            responses.cancel()
            break
    emit_stream(count, messages, time.perf_counter() - start)


async def first_contact(args: argparse.Namespace) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=args.cert_pem)
    times = []
    for i in range(args.tries):
        start = time.perf_counter()
        async with grpc.aio.secure_channel(f"{HOST}:{args.port}", creds) as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/Echo",
                request_serializer=dumps,
                response_deserializer=loads,
            )
            out = await call({"i": i})
            times.append(time.perf_counter() - start)
        if out["i"] != i:
            raise RuntimeError(f"bad echo {out!r}")
    emit_latencies(times)


async def client_main(args: argparse.Namespace) -> None:
    if args.mode == "first":
        await first_contact(args)
        return
    creds = grpc.ssl_channel_credentials(root_certificates=args.cert_pem)
    async with grpc.aio.secure_channel(f"{HOST}:{args.port}", creds) as channel:
        await channel.channel_ready()
        if args.mode in ("unary", "unary_wait"):
            method = "EchoAfterWait" if args.mode == "unary_wait" else "Echo"
            await unary(channel, args.seconds, args.in_flight, method)
        else:
            await stream(channel, args.messages, args.max_seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--mode", default="unary")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--tries", type=int, default=200)
    args = parser.parse_args()
    args.cert_pem = Path(args.cert).read_bytes()
    args.key_pem = Path(args.key).read_bytes() if args.key else None
    try:
        asyncio.run(server(args) if args.role == "server" else client_main(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
