"""What one new-stream round trip costs, counted in events rather than
timed: trio task steps, scheduler rounds (waits for I/O), UDP datagrams and
Python function calls, over real QUIC on loopback, both ends in this
process (bench/quic.py's round-trip row, as bench/call_costs.py --only rr
counts it).

A regression guard, as tests/rpc/test_call_costs.py is for RPC calls: the
counts are stable from run to run, so a change that adds a task switch, a
packet or a layer of Python to every stream fails here. Each ceiling is
what main measured when it was set plus a margin; lower it when a change
makes round trips cheaper, and say so in the commit.

Measured when set (300 round trips after 20 to warm up; the client opens a
stream, writes 100 bytes with its FIN, reads the echo to its FIN and closes;
the server's handler runs under ``serve_streams``): 12.0 task steps, 9.0
rounds, 2.0 datagrams (the request and the reply with their FINs; the
ACKs ride on them), 651 Python calls. Of the steps, 8 were the
schedule points that end the stream operations which did not wait (trio's
stream contract: each one is a schedule point, checked by trio's
conformance suite in test_loopback); docs/quic.md has what skipping them
would save.

Lowered when a stream operation's schedule point came to tell the idle
flush that its task is runnable (no ``current_statistics()`` in the rounds
it starts) and ``serve_streams`` to close a handler's stream without a
schedule point as its task ends: 12.0 -> 11.0 task steps, 651 -> 589
Python calls; when the idle flush came to know the same of a task our
input woke, and that a flush woke nobody: 589 -> 582.
"""

from __future__ import annotations

import trio

from polykey.quic import QUICConnection, QUICStream
from polykey.testing import PythonCallCounter, SchedulerCounter

from .helpers import open_pair

STEPS_PER_ROUND_TRIP = 11.5
ROUNDS_PER_ROUND_TRIP = 9.5
DATAGRAMS_PER_ROUND_TRIP = 2.3
PYTHON_CALLS_PER_ROUND_TRIP = 630.0

PAYLOAD = b"\x42" * 100


async def echo(stream: QUICStream) -> None:
    data = b""
    while part := await stream.receive_some():
        data += part
    await stream.send_all_and_eof(data)


async def round_trip(conn: QUICConnection) -> None:
    stream = await conn.open_stream()
    await stream.send_all_and_eof(PAYLOAD)
    reply = b""
    while part := await stream.receive_some():
        reply += part
    await stream.aclose()
    assert reply == PAYLOAD


async def test_a_new_stream_round_trip_costs_no_more_than_it_did() -> None:
    trips = 300
    with trio.fail_after(30):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            await nursery.start(pair.server.serve_streams, echo)
            conn = await pair.client.connect(pair.server_socket.local_address)
            for _ in range(20):  # warm up: streams, credit, caches
                await round_trip(conn)
            await trio.sleep(0.1)  # let the last ACKs go
            socks = (pair.client_socket, pair.server_socket)
            before = sum(s.statistics.datagrams_sent for s in socks)
            with SchedulerCounter() as counter:
                for _ in range(trips):
                    await round_trip(conn)
            datagrams = sum(s.statistics.datagrams_sent for s in socks) - before
            with PythonCallCounter() as calls:
                for _ in range(trips):
                    await round_trip(conn)
            nursery.cancel_scope.cancel()
    assert counter.steps / trips <= STEPS_PER_ROUND_TRIP, counter.steps / trips
    assert counter.rounds / trips <= ROUNDS_PER_ROUND_TRIP, counter.rounds / trips
    assert datagrams / trips <= DATAGRAMS_PER_ROUND_TRIP, datagrams / trips
    assert calls.calls / trips <= PYTHON_CALLS_PER_ROUND_TRIP, calls.calls / trips
    # Real counts: every round trip sends its request and its reply, and
    # runs both ends' stream code.
    assert datagrams >= 2 * trips
    assert calls.calls / trips >= 100, calls.calls / trips
