"""A QUIC connection whose packets travel inside DATAGRAM frames of two
other connections (the shape of a relayed connection): above the socket it
is an ordinary, end-to-end encrypted QUICConnection."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable

import attrs
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


async def test_a_connection_over_datagrams_through_a_relay() -> None:
    with trio.fail_after(30):
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
            assert a_to_r.datagram_max_size() is not None
            assert a_to_r.datagram_max_size() >= 1208  # type: ignore[operator]

            cid_a, cid_b = os.urandom(8), os.urandom(8)
            seen_by_relay: list[bytes] = []

            # The relay swaps circuit ids and forwards; it holds no keys of
            # the inner connection.
            def relay(into: QUICConnection, cid: bytes) -> object:
                def forward(payload: bytes) -> None:
                    seen_by_relay.append(payload[8:])
                    into.send_datagram(cid + payload[8:])

                return forward

            r_from_a.on_datagram(relay(r_from_b, cid_b))  # type: ignore[arg-type]
            r_from_b.on_datagram(relay(r_from_a, cid_a))  # type: ignore[arg-type]
            path_a = a_sock.open_virtual_path(lambda p: a_to_r.send_datagram(cid_a + p))
            path_b = b_sock.open_virtual_path(lambda p: b_to_r.send_datagram(cid_b + p))
            a_to_r.on_datagram(lambda d: path_a.deliver(d[8:]))
            b_to_r.on_datagram(lambda d: path_b.deliver(d[8:]))

            inner_server = QUICServer(b_sock, tls_identity("b-inner"), config=OUTER)
            inner = await QUICClient(
                a_sock, tls_identity("a-inner"), config=INNER
            ).connect(path_a.address)
            accepted = await inner_server.accept()
            assert accepted.remote_address == path_b.address
            body = os.urandom(2 * 1024 * 1024)
            stream = await inner.open_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all_and_eof, body)
                peer = await accepted.accept_stream()
                got = bytearray()
                while data := await peer.receive_some():
                    got += data
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
            # The relay saw packets, never the plaintext.
            assert len(seen_by_relay) > 1000
            joined = b"".join(seen_by_relay)
            assert body[1000:1100] not in joined
            assert path_a.packets_sent > 0
            assert path_b.packets_received > 0
            # Closing the path: the inner connection can no longer be used.
            path_a.close()
            assert path_a.address not in a_sock._virtual
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
        server = QUICServer(b_sock, tls_identity("b"), config=OUTER)
        body = os.urandom(size)
        got = bytearray()
        finished = False
        with trio.move_on_after(seconds):
            conn = await QUICClient(a_sock, tls_identity("a"), config=INNER).connect(
                paths[0].address
            )
            accepted = await server.accept()
            stream = await conn.open_stream()
            nursery.start_soon(stream.send_all_and_eof, body)
            peer = await accepted.accept_stream()
            while data := await peer.receive_some():
                got += data
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
