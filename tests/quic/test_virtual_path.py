"""A QUIC connection whose packets travel inside DATAGRAM frames of two
other connections (the shape of a relayed connection): above the socket it
is an ordinary, end-to-end encrypted QUICConnection."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator, Callable

import attrs
import pytest
import trio

from polykey.quic import (
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICServer,
    QUICSocket,
    VirtualPath,
)

from .helpers import tls_identity

OUTER = QUICConfig(datagram_queue=1024)
#: Inner packets must fit in an outer DATAGRAM with our 8-byte circuit id.
INNER = attrs.evolve(OUTER, max_udp_payload_size=1200)


@attrs.frozen
class Triangle:
    """A and B each connected to a relay R, with datagrams on (the outer
    connections), and a circuit id for each end."""

    a_sock: QUICSocket
    b_sock: QUICSocket
    a_to_r: QUICConnection
    r_from_a: QUICConnection
    b_to_r: QUICConnection
    r_from_b: QUICConnection
    cid_a: bytes = attrs.field(factory=lambda: os.urandom(8))
    cid_b: bytes = attrs.field(factory=lambda: os.urandom(8))


@contextlib.asynccontextmanager
async def relay_triangle() -> AsyncIterator[Triangle]:
    async with (
        QUICSocket("127.0.0.1") as a_sock,
        QUICSocket("127.0.0.1") as r_sock,
        QUICSocket("127.0.0.1") as b_sock,
    ):
        r_server = QUICServer(r_sock, tls_identity("relay"), config=OUTER)
        a_to_r = await QUICClient(a_sock, tls_identity("a"), config=OUTER).connect(
            r_sock.local_address
        )
        r_from_a = await r_server.accept()
        b_to_r = await QUICClient(b_sock, tls_identity("b"), config=OUTER).connect(
            r_sock.local_address
        )
        r_from_b = await r_server.accept()
        yield Triangle(a_sock, b_sock, a_to_r, r_from_a, b_to_r, r_from_b)


async def transfer(
    a_sock: QUICSocket,
    b_sock: QUICSocket,
    path: VirtualPath,
    body: bytes,
    got: bytearray,
) -> tuple[QUICConnection, QUICConnection]:
    """Connect from ``a_sock`` to a server on ``b_sock`` over ``path``, send
    ``body`` on one stream, appending what B receives to ``got`` until the
    stream's end. Returns both ends of that (inner) connection."""
    server = QUICServer(b_sock, tls_identity("b-inner"), config=OUTER)
    inner = await QUICClient(a_sock, tls_identity("a-inner"), config=INNER).connect(
        path.address
    )
    accepted = await server.accept()
    stream = await inner.open_stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all_and_eof, body)
        peer = await accepted.accept_stream()
        while data := await peer.receive_some():
            got += data
    return inner, accepted


async def test_a_connection_over_datagrams_through_a_relay() -> None:
    with trio.fail_after(30):
        async with relay_triangle() as t:
            assert t.a_to_r.datagram_max_size() is not None
            assert t.a_to_r.datagram_max_size() >= 1208  # type: ignore[operator]
            seen_by_relay: list[bytes] = []

            # The relay swaps circuit ids and forwards; it holds no keys of
            # the inner connection.
            def relay(into: QUICConnection, cid: bytes) -> object:
                def forward(payload: bytes) -> None:
                    seen_by_relay.append(payload[8:])
                    into.send_datagram(cid + payload[8:])

                return forward

            t.r_from_a.on_datagram(relay(t.r_from_b, t.cid_b))  # type: ignore[arg-type]
            t.r_from_b.on_datagram(relay(t.r_from_a, t.cid_a))  # type: ignore[arg-type]
            path_a = t.a_sock.open_virtual_path(
                lambda p: t.a_to_r.send_datagram(t.cid_a + p)
            )
            path_b = t.b_sock.open_virtual_path(
                lambda p: t.b_to_r.send_datagram(t.cid_b + p)
            )
            t.a_to_r.on_datagram(lambda d: path_a.deliver(d[8:]))
            t.b_to_r.on_datagram(lambda d: path_b.deliver(d[8:]))

            body = os.urandom(2 * 1024 * 1024)
            got = bytearray()
            inner, accepted = await transfer(t.a_sock, t.b_sock, path_a, body, got)
            assert accepted.remote_address == path_b.address
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
            # The relay saw packets, never the plaintext.
            assert len(seen_by_relay) > 1000
            joined = b"".join(seen_by_relay)
            assert body[1000:1100] not in joined
            assert path_a.packets_sent > 0
            assert path_b.packets_received > 0
            # Closing the path: the socket forgets it, so the inner
            # connection can no longer be used.
            assert t.a_sock.statistics.virtual_paths == 1
            path_a.close()
            assert path_a.closed
            assert t.a_sock.statistics.virtual_paths == 0
            await inner.aclose()


async def test_datagrams_need_both_sides() -> None:
    with trio.fail_after(10):
        async with QUICSocket("127.0.0.1") as a_sock, QUICSocket("127.0.0.1") as b_sock:
            server = QUICServer(b_sock, tls_identity("b"))
            conn = await QUICClient(a_sock, tls_identity("a"), config=OUTER).connect(
                b_sock.local_address
            )
            await server.accept()
            assert conn.datagram_max_size() is None
            assert not conn.send_datagram(b"x")


async def _through(
    mangle: Callable[[bytes], bytes | None], size: int, seconds: float = 20
) -> tuple[bool, bytes, bytes]:
    """A connection between two sockets whose every packet passes through
    ``mangle`` (None: dropped), and ``size`` bytes sent over it. Returns
    (whether the stream reached its end, sent, received)."""
    async with (
        QUICSocket("127.0.0.1") as a_sock,
        QUICSocket("127.0.0.1") as b_sock,
        trio.open_nursery() as nursery,
    ):
        paths: list[VirtualPath] = []
        # Packets are carried by a task, as a relay's datagrams are: a path's
        # send must never re-enter the socket that is sending.
        send_ch, recv_ch = trio.open_memory_channel[tuple[int, bytes]](4096)

        def carry(to: int) -> Callable[[bytes], bool]:
            def send(packet: bytes) -> bool:
                out = mangle(packet)
                if out is not None:
                    try:
                        send_ch.send_nowait((to, out))
                    except trio.WouldBlock:
                        return False
                return True

            return send

        async def pump() -> None:
            async for to, packet in recv_ch:
                paths[to].deliver(packet)

        nursery.start_soon(pump)

        paths.append(a_sock.open_virtual_path(carry(1)))
        paths.append(b_sock.open_virtual_path(carry(0)))
        body = os.urandom(size)
        got = bytearray()
        finished = False
        with trio.move_on_after(seconds):
            await transfer(a_sock, b_sock, paths[0], body, got)
            finished = True
        nursery.cancel_scope.cancel()
    return finished, body, bytes(got)


async def test_a_lossy_relay_costs_time_not_data() -> None:
    rng = random.Random(7)
    with trio.fail_after(30):
        ok, sent, got = await _through(
            lambda p: None if rng.random() < 0.1 else p, 1 << 20
        )
    assert ok
    assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()


async def test_a_relay_that_alters_packets_cannot_alter_data() -> None:
    rng = random.Random(8)

    def flip_some(packet: bytes) -> bytes:
        if rng.random() < 0.05:
            i = rng.randrange(len(packet))
            return packet[:i] + bytes([packet[i] ^ 0x40]) + packet[i + 1 :]
        return packet

    with trio.fail_after(30):
        ok, sent, got = await _through(flip_some, 1 << 20)
    # Altered packets fail QUIC's authentication and count as lost.
    assert ok
    assert got == sent


async def test_a_relay_that_alters_every_packet_gets_no_connection() -> None:
    def flip(packet: bytes) -> bytes:
        return packet[:-1] + bytes([packet[-1] ^ 1])

    with trio.fail_after(30):
        ok, _, got = await _through(flip, 1000, seconds=2)
    assert not ok
    assert got == b""


async def _carried(
    budget: int, size: int, seconds: float
) -> tuple[bool, bytes, bytes, dict[str, int]]:
    """A connection whose packets travel as DATAGRAM frames of two carriers
    through a relay that forwards them in C (forward_datagrams), with the
    ends' paths carried in C too; ``size`` bytes sent over it. Returns
    (whether the stream reached its end, sent, received, counts)."""
    counts = {"relay_handler": 0, "end_handler": 0, "forwarded": 0, "bytes": 0}
    async with relay_triangle() as t:

        def relay_handler(payload: bytes) -> None:
            counts["relay_handler"] += 1  # what the forwards did not take

        def forwarded(datagrams: int, size: int, dropped: int) -> None:
            counts["forwarded"] += datagrams
            counts["bytes"] += size

        t.r_from_a.on_datagram(relay_handler)
        t.r_from_b.on_datagram(relay_handler)
        forwards = [
            t.r_from_a.forward_datagrams(
                t.cid_a, t.r_from_b, t.cid_b, budget=budget, on_forwarded=forwarded
            ),
            t.r_from_b.forward_datagrams(
                t.cid_b, t.r_from_a, t.cid_a, budget=budget, on_forwarded=forwarded
            ),
        ]
        path_a = t.a_sock.open_virtual_path(carrier=t.a_to_r, prefix=t.cid_a)
        path_b = t.b_sock.open_virtual_path(carrier=t.b_to_r, prefix=t.cid_b)

        def end(path: VirtualPath) -> Callable[[bytes], None]:
            def deliver(data: bytes) -> None:
                counts["end_handler"] += 1
                path.deliver(data[8:])

            return deliver

        t.a_to_r.on_datagram(end(path_a))
        t.b_to_r.on_datagram(end(path_b))

        body = os.urandom(size)
        got = bytearray()
        finished = False
        with trio.move_on_after(seconds):
            _, accepted = await transfer(t.a_sock, t.b_sock, path_a, body, got)
            assert accepted.remote_address == path_b.address
            finished = True
            counts["inner_in"] = accepted.statistics().datagrams_in
        counts["counted"] = sum(f.counters()[0] for f in forwards)
        counts["sent_by_a"] = path_a.packets_sent
        # What reaches the handler once the forwards are gone (the inner
        # connections' last packets) does not count.
        counts["relay_handler_open"] = counts["relay_handler"]
        for forward in forwards:
            forward.close()
            assert forward.closed
    return finished, body, bytes(got), counts


async def test_a_relay_forwards_in_c_and_the_ends_deliver_in_c() -> None:
    with trio.fail_after(30):
        ok, sent, got, counts = await _carried(1 << 30, 2 * 1024 * 1024, 25)
    assert ok
    assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
    # Every frame went relay to relay in C, and the owner heard of each.
    assert counts["relay_handler_open"] == 0
    assert counts["forwarded"] == counts["counted"] > 1500
    assert counts["bytes"] > len(sent)
    # The ends' handlers saw the handshake, C delivered the rest.
    assert counts["end_handler"] < 50
    assert counts["inner_in"] > 1000
    assert counts["sent_by_a"] > 1000


async def test_a_forward_stops_at_its_budget() -> None:
    budget = 100_000
    with trio.fail_after(30):
        ok, _, got, counts = await _carried(budget, 1024 * 1024, 3)
    assert not ok
    assert len(got) < budget
    # Each way at most the budget; later frames reach the relay's handler.
    assert 0 < counts["bytes"] <= 2 * budget
    assert counts["relay_handler"] > 0


async def test_a_carried_path_needs_a_prefix_and_one_way_to_send() -> None:
    with trio.fail_after(10):
        async with QUICSocket("127.0.0.1") as sock, QUICSocket("127.0.0.1") as peer:
            server = QUICServer(peer, tls_identity("b"), config=OUTER)
            conn = await QUICClient(sock, tls_identity("a"), config=OUTER).connect(
                peer.local_address
            )
            other = await server.accept()
            with pytest.raises(ValueError, match="prefix"):
                sock.open_virtual_path(carrier=conn)
            with pytest.raises(ValueError, match="one of"):
                sock.open_virtual_path(lambda p: True, carrier=conn, prefix=b"x" * 8)
            with pytest.raises(ValueError, match="one of"):
                sock.open_virtual_path()
            conn.forward_datagrams(b"a" * 8, conn, b"b" * 8, budget=1)
            with pytest.raises(ValueError, match="exists"):
                conn.forward_datagrams(b"a" * 8, conn, b"c" * 8, budget=1)
            with pytest.raises(ValueError, match="bytes"):
                conn.forward_datagrams(b"d" * 4, conn, b"e" * 4, budget=1)
            with pytest.raises(ValueError, match="one length"):
                other.forward_datagrams(b"d" * 8, conn, b"e" * 4, budget=1)
