"""QUIC through a seeded lossy relay: loss, duplication, reordering, delay."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio

from polykey.quic import CloseKind, QUICConfig, QUICConnection, QUICServer, QUICSocket
from polykey.testing import LossyUDPRelay

from .helpers import tls_identity
from .test_loopback import echo_streams


async def _through_relay(
    relay: LossyUDPRelay, client_socket: QUICSocket, config: QUICConfig | None = None
) -> QUICConnection:
    from polykey.quic import QUICClient

    client = QUICClient(client_socket, tls_identity("client"), config=config)
    with trio.fail_after(20):
        return await client.connect(relay.address)


@pytest.mark.parametrize("seed", [1, 2])
async def test_transfer_intact_at_five_percent_loss(seed: int) -> None:
    size = 4 * 1024 * 1024
    async with (
        QUICSocket("127.0.0.1") as ss,
        QUICSocket("127.0.0.1") as cs,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(ss, tls_identity("server"))
        nursery.start_soon(server.serve, echo_streams)
        relay = LossyUDPRelay(
            ss.local_address, seed=seed, drop=0.05, duplicate=0.02, delay=0.05
        )
        await nursery.start(relay.run)
        conn = await _through_relay(relay, cs)
        rng = random.Random(seed)
        payload = rng.randbytes(size)
        stream = await conn.open_stream()
        received = bytearray()

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        with trio.fail_after(60):
            async with trio.open_nursery() as transfer:
                transfer.start_soon(send)
                while data := await stream.receive_some():
                    received += data
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        assert relay.statistics.dropped > 0
        assert relay.statistics.duplicated > 0
        assert relay.statistics.delayed > 0
        assert conn.statistics().quiche.lost > 0
        nursery.cancel_scope.cancel()


async def test_many_small_streams_through_loss() -> None:
    async with (
        QUICSocket("127.0.0.1") as ss,
        QUICSocket("127.0.0.1") as cs,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(ss, tls_identity("server"))
        nursery.start_soon(server.serve, echo_streams)
        relay = LossyUDPRelay(ss.local_address, seed=3, drop=0.05, delay=0.1)
        await nursery.start(relay.run)
        conn = await _through_relay(relay, cs)

        async def one(i: int) -> None:
            stream = await conn.open_stream()
            async with stream:
                await stream.send_all(b"%d" % i)
                await stream.send_eof()
                got = b""
                while data := await stream.receive_some():
                    got += data
                assert got == b"%d" % i

        with trio.fail_after(60):
            async with trio.open_nursery() as streams:
                for i in range(200):
                    streams.start_soon(one, i)
        nursery.cancel_scope.cancel()


async def test_vanished_peer_ends_within_idle_timeout() -> None:
    config = QUICConfig(max_idle_timeout=0.5, keep_alive_interval=0.1)
    async with (
        QUICSocket("127.0.0.1") as ss,
        QUICSocket("127.0.0.1") as cs,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(ss, tls_identity("server"), config=config)
        relay = LossyUDPRelay(ss.local_address)
        await nursery.start(relay.run)
        conn = await _through_relay(relay, cs, config)
        server_conn = await server.accept()
        await trio.sleep(0.6)  # keep-alive holds it past the idle timeout
        assert not conn.closed
        relay.blackhole = True  # the server vanishes without a word
        start = trio.current_time()
        with trio.fail_after(5):
            reason = await conn.wait_closed()
            server_reason = await server_conn.wait_closed()
        assert reason.kind is CloseKind.IDLE_TIMEOUT
        assert server_reason.kind is CloseKind.IDLE_TIMEOUT
        # quiche's idle timeout is max(idle, 3 PTO); loopback PTOs are tiny.
        assert trio.current_time() - start < 2.0
        nursery.cancel_scope.cancel()
