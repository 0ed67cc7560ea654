"""What an idle connection costs in Python objects: a guard counted in bytes.

A public node holds thousands of idle connections, and bench/quic.py's
"server RSS per idle connection" row is what each costs it. Most of that
row is quiche's own state; the Python share is what we control, and what
this test counts with tracemalloc (not timed, so it does not depend on the
machine's load): both ends of each connection, in one process, the
server's end served by ``serve()`` with its handler task waiting in
``accept_stream``, as a node's connections wait, or by ``serve_streams()``
with no task at all.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
import trio
import trio.testing

from polykey.quic import QUICConnection, QUICStream

from .helpers import open_pair

CONNECTIONS = 100
#: Python bytes per idle connection, both ends together, with these small
#: certificates (each end keeps its peer's chain), the server's end served
#: by serve(): 22.8 KB before the idle state was made when first needed and
#: QUICConnection got slots, 14.8 KB after, 8.8 KB once the socket's timer
#: task replaced a driver task per connection, 7.9 KB once accept_stream
#: parked its task without a ParkingLot and the timer queue shed its
#: cancelled entries, 6.7 KB once the server's callbacks and the
#: connection's callback lists, scratch method, stream-id maxima, route ids
#: and cached peer address cost less (7.8 KB just before).
SERVE_BUDGET = 7_200
#: The same, served by serve_streams(): no task at the server's end.
STREAMS_BUDGET = 4_600


@pytest.mark.parametrize("how", ["serve", "serve_streams"])
async def test_idle_connection_python_bytes(how: str) -> None:
    budget = SERVE_BUDGET if how == "serve" else STREAMS_BUDGET
    waiting = 0
    all_waiting = trio.Event()

    async def handler(conn: QUICConnection) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == CONNECTIONS + 1:
            all_waiting.set()
        try:
            while True:
                await conn.accept_stream()
        except trio.BrokenResourceError:
            pass

    async def stream_handler(stream: QUICStream) -> None:
        raise AssertionError("no stream is opened here")

    async def all_handed_over() -> None:
        # Verified by the server (it counts them accepted when they are),
        # then taken by serve_streams' accept loop.
        stats = pair.server.statistics
        for _ in range(1000):
            if stats.accepted == CONNECTIONS + 1:
                break
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(60):
        async with open_pair() as pair, trio.open_nursery() as nursery:
            if how == "serve":
                nursery.start_soon(pair.server.serve, handler)
                wait_ready = all_waiting.wait
            else:
                await nursery.start(pair.server.serve_streams, stream_handler)
                wait_ready = all_handed_over
            address = pair.server_socket.local_address
            # One connection first: what every later one shares (the
            # sockets' buffers, code objects, caches) is made by then.
            conns = [await pair.client.connect(address)]
            await trio.sleep(0.2)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.take_snapshot()
                for _ in range(CONNECTIONS):
                    conns.append(await pair.client.connect(address))
                # Every server end accepted and its handler waiting (or
                # handed over to serve_streams).
                await wait_ready()
                await trio.sleep(0.2)
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            assert all(not c.closed for c in conns)
            # Cancelled timers are dropped before they outnumber a quarter
            # of the live connections (plus a constant).
            live = len(conns)
            assert len(pair.server_socket._timers) <= live + live // 4 + 64
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            grown = sum(
                stat.size_diff
                for stat in after.filter_traces(ignore).compare_to(
                    before.filter_traces(ignore), "filename"
                )
            )
            per_connection = grown / CONNECTIONS
            assert 0 < per_connection <= budget, per_connection
            assert pair.server.statistics.accepted == CONNECTIONS + 1
            for conn in conns:
                conn.close()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("pattern", ["first six", "every other"])
async def test_refused_batches_are_sent_when_the_socket_drains(pattern: str) -> None:
    # Without a task per connection, the socket's writer task retries the
    # batches the kernel refused: here the client's socket refuses sends of
    # a 1 MiB transfer (as a full send buffer does), for two connections at
    # once, and both transfers still arrive whole. "every other": a retried
    # batch goes and the next flush is refused again, which the writer must
    # not mistake for done.
    size = 1 << 20
    async with open_pair() as pair:
        sock = pair.client_socket
        real = sock.send_segments
        refusals = calls = 0

        def refusing(data: memoryview, segment: int, address: Any) -> bool:
            nonlocal refusals, calls
            calls += 1
            if refusals < 6 and (pattern == "first six" or calls % 2):
                refusals += 1
                return False
            return real(data, segment, address)

        pairs = [await pair.connect() for _ in range(2)]
        received = [0, 0]

        async def transfer(i: int) -> None:
            client_conn, server_conn = pairs[i]
            cs = await client_conn.open_stream()
            await cs.send_all(b"x" * size)
            await cs.send_eof()
            ss = await server_conn.accept_stream()
            while data := await ss.receive_some():
                received[i] += len(data)

        with trio.fail_after(20):
            sock.send_segments = refusing  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(transfer, i)
        assert refusals == 6
        assert received == [size, size]
        blocked = sum(c.statistics().send_blocked for c, _ in pairs)
        assert blocked >= 2
