"""What one small RPC call costs, counted: trio task steps, scheduler
rounds (waits for I/O), UDP datagrams and socket syscalls, per unary call
(1 and 64 in flight, the 64 as bench/rpc.py's: tasks that each call one
after another; ``wait1`` and ``wait64``: the same with a handler
that waits once before it answers, as one doing I/O does), per
server-streamed message and per bare QUIC new-stream round trip (``rr``,
bench/quic.py's row), client and server in one process on loopback (one
core's work: the counts, not a rate).

    .venv/bin/python bench/call_costs.py                 # all six
    .venv/bin/python bench/call_costs.py --only stream --count 50000

A fixed amount of work per run, so timing the whole process compares two
builds (``/usr/bin/time -v``); ``--profile FILE`` writes a cProfile of the
measured part; ``--python-calls`` counts Python function calls per call
(``sys.setprofile``: its time is then the hook's, not the code's). See
docs/quic.md, "Where a small call's time goes".
"""

from __future__ import annotations

import argparse
import cProfile
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import trio
from _rpc_polykey import API, JSON, Count, Echo, EchoAfterWait

from polykey.keys import NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConnection,
    QUICServer,
    QUICSocket,
    QUICStream,
    node_tls_identity,
    node_verifier,
)
from polykey.rpc import RPCClient, RPCServer
from polykey.testing import PythonCallCounter, SchedulerCounter


class _Syscalls:
    """Counts the socket methods the QUIC layer sends with (sendmsg,
    sendto): wraps them on the sockets' classes. Its reads are recvmmsg
    calls in C, counted by the sockets (``SocketStatistics.reads``)."""

    NAMES = ("sendmsg", "sendto")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> _Syscalls:
        for name in self.NAMES:
            original = getattr(socket.socket, name)
            self._saved[name] = original
            setattr(socket.socket, name, self._wrap(name, original))
        return self

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        counts = self.counts

        def counted(sock: socket.socket, *args: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return original(sock, *args)

        return counted

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(socket.socket, name, original)


_PAYLOAD = b"\x42" * 100
#: Calls in flight of the unary64 and wait64 rows.
_IN_FLIGHT = 64


async def _round_trip(conn: QUICConnection) -> None:
    """bench/quic.py's new-stream round trip: 100 bytes with the FIN on a
    new stream, read the echo to its FIN, close."""
    stream = await conn.open_stream()
    await stream.send_all_and_eof(_PAYLOAD)
    reply = b""
    while part := await stream.receive_some():
        reply += part
    await stream.aclose()
    assert reply == _PAYLOAD


async def _measure(
    mode: str, count: int, profile: str | None, python_calls: bool
) -> JSON:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    async with (
        QUICSocket("127.0.0.1") as sa,
        QUICSocket("127.0.0.1") as sb,
        RPCServer(
            {"echo": Echo(), "echo_after_wait": EchoAfterWait(), "count": Count()}
        ) as rpc,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(sb, node_tls_identity(b), verifier=node_verifier())

        def serve(conn: QUICConnection) -> None:
            # As a node serves (polykey.nodes' connection manager): each
            # stream the peer opens goes from the connection's callback to
            # the RPC server, no task waiting in accept_stream.
            meta = {"node_id": conn.peer_identity, "host": conn.remote_address[0]}
            conn.deliver_streams_to(rpc.stream_callback(meta, connection=conn))

        async def echo(stream: QUICStream) -> None:
            # As bench/_quic_polykey.py's server: read to the FIN, echo.
            data = b""
            while part := await stream.receive_some():
                data += part
            await stream.send_all_and_eof(data)

        if mode == "rr":
            await nursery.start(server.serve_streams, echo)
        conn = await QUICClient(sa, node_tls_identity(a)).connect(
            sb.local_address, verifier=node_verifier(b.node_id)
        )
        if mode != "rr":
            serve(await server.accept())
        client = RPCClient(API, conn.open_stream)
        for i in range(50):  # warm up: streams, credit, caches
            if mode == "rr":
                await _round_trip(conn)
            else:
                await client.methods.echo({"i": i})
        await trio.sleep(0.1)  # let the last ACKs go

        def datagrams() -> int:
            return sa.statistics.datagrams_sent + sb.statistics.datagrams_sent

        def reads() -> int:
            return sa.statistics.reads + sb.statistics.reads

        profiler = cProfile.Profile() if profile else None
        d0, r0 = datagrams(), reads()
        start = time.perf_counter()
        pycalls = PythonCallCounter()
        with _Syscalls() as syscalls, SchedulerCounter() as counter:
            if python_calls:
                pycalls.__enter__()
            if profiler is not None:
                profiler.enable()
            try:
                if mode == "stream":
                    seen = 0
                    async with client.methods.count({"n": count}) as results:
                        async for r in results:
                            assert r["i"] == seen
                            seen += 1
                    assert seen == count
                elif mode == "rr":
                    for _ in range(count):
                        await _round_trip(conn)
                elif mode in ("unary1", "wait1"):
                    method = client.methods.echo
                    if mode == "wait1":
                        method = client.methods.echo_after_wait
                    for i in range(count):
                        assert (await method({"i": i}))["i"] == i
                else:
                    # As bench/rpc.py's clients: 64 tasks, each making its
                    # calls one after another (no task or limiter per call).
                    method = client.methods.echo
                    if mode == "wait64":
                        method = client.methods.echo_after_wait

                    async def worker(first: int) -> None:
                        for i in range(first, count, _IN_FLIGHT):
                            out = await method({"i": i})
                            assert out["i"] == i

                    async with trio.open_nursery() as calls:
                        for w in range(_IN_FLIGHT):
                            calls.start_soon(worker, w)
            finally:
                if profiler is not None:
                    profiler.disable()
                if python_calls:
                    pycalls.__exit__(None, None, None)
        elapsed = time.perf_counter() - start
        if profiler is not None and profile:
            profiler.dump_stats(profile)
        sent = datagrams() - d0
        syscalls.counts["recvmmsg"] = reads() - r0
        nursery.cancel_scope.cancel()
    per = {"stream": "message", "rr": "round trip"}.get(mode, "call")
    extra = {"python_calls": round(pycalls.calls / count, 1)} if python_calls else {}
    return {
        "mode": mode,
        "count": count,
        "per": per,
        "us_per": round(elapsed / count * 1e6, 1),
        "task_steps": round(counter.steps / count, 2),
        "rounds": round(counter.rounds / count, 2),
        "datagrams": round(sent / count, 3),
        "syscalls": {
            k: round(v / count, 3) for k, v in sorted(syscalls.counts.items())
        },
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="comma-separated: unary1, unary64, wait1, wait64, stream, rr"
    )
    parser.add_argument("--count", type=int, help="calls or messages (2000 / 20000)")
    parser.add_argument("--profile", help="cProfile of the measured part (one mode)")
    parser.add_argument(
        "--python-calls",
        action="store_true",
        help="count Python function calls per call (slows the run)",
    )
    args = parser.parse_args()
    modes = (
        args.only.split(",")
        if args.only
        else ["unary1", "unary64", "wait1", "wait64", "stream", "rr"]
    )
    for mode in modes:
        count = args.count or (20_000 if mode == "stream" else 2_000)
        print(
            json.dumps(
                trio.run(_measure, mode, count, args.profile, args.python_calls)
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
