"""The floor under bench/quic.py's round-trip row: bare UDP on trio.

    python bench/_udp_trio.py server
    python bench/_udp_trio.py client PORT --mode rr --seconds S

No QUIC, no crypto, no streams: the client sends 100 bytes, the server's one
task echoes them, the client waits for them and sends again. What this
reaches is what any design pays per round trip for two trio processes to
wake, read a datagram and write one; a QUIC implementation driven from trio
(ours, aioquic) does that and more on both sides, so its new-stream round
trips cannot go faster than this row. Only ``rr`` is measured.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import trio
from _util import emit, ready

HOST = "127.0.0.1"


async def server() -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((HOST, 0))
    ready(sock.getsockname()[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echo, sock)
        # The driver closes our stdin to stop us.
        await trio.to_thread.run_sync(_wait_stdin, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


def _wait_stdin() -> None:
    sys.stdin.read()


async def _echo(sock: trio.socket.SocketType) -> None:
    while True:
        data, address = await sock.recvfrom(2048)
        await sock.sendto(data, address)


async def client(port: int, seconds: float) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.connect((HOST, port))
    payload = b"\x42" * 100
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        await sock.send(payload)
        if await sock.recv(2048) != payload:
            raise RuntimeError("bad echo")
        count += 1
    elapsed = time.perf_counter() - start
    emit({"count": count, "seconds": elapsed, "per_s": count / elapsed})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--mode", default="rr", choices=["rr"])
    parser.add_argument("--seconds", type=float, default=3.0)
    # bench/quic.py passes every client the same options; these are unused.
    for unused in (
        "--size",
        "--max-seconds",
        "--count",
        "--concurrency",
        "--idle-limit",
    ):
        parser.add_argument(unused)
    args = parser.parse_args()
    if args.role == "server":
        trio.run(server)
    else:
        trio.run(client, args.port, args.seconds)


if __name__ == "__main__":
    main()
