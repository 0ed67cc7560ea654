"""What hole punching needs of the QUIC layer: an Initial re-sent through a
path that opens late, and the sources of stray (non-QUIC) datagrams."""

from __future__ import annotations

import random
import socket

import trio

from polykey.quic import QUICClient, QUICServer, QUICSocket, spray_delays

from .helpers import Gate, tls_identity


async def test_a_sprayed_dial_gets_through_a_path_that_opens_late() -> None:
    with trio.fail_after(20):
        async with (
            QUICSocket("127.0.0.1") as server_socket,
            QUICSocket("127.0.0.1") as client_socket,
            trio.open_nursery() as nursery,
        ):
            server = QUICServer(server_socket, tls_identity("server"))
            client = QUICClient(client_socket, tls_identity("client"))
            gate = Gate(server_socket.local_address)
            await nursery.start(gate.run)

            async def open_after_drops() -> None:
                while gate.dropped < 3:  # noqa: ASYNC110 - polls a counter
                    await trio.sleep(0.005)
                gate.opened.set()

            nursery.start_soon(open_after_drops)
            conn = await client.connect(gate.address, spray=True)
            assert conn.answered
            # The very same first Initial went out several times: the first
            # copies were dropped, a later one got through.
            assert max(gate.seen.values()) >= 4
            # Once answered there is nothing more to re-send.
            assert not conn.resend_first_flight()
            accepted = await server.accept()
            stream = await conn.open_stream()
            await stream.send_all_and_eof(b"through")
            peer = await accepted.accept_stream()
            assert await peer.receive_some() == b"through"
            nursery.cancel_scope.cancel()


async def test_an_unsprayed_dial_sends_its_initial_once_per_probe() -> None:
    """Without spray, quiche alone decides: no copy of the first Initial is
    sent before its probe timeout (about a second)."""
    with trio.fail_after(20):
        async with (
            QUICSocket("127.0.0.1") as server_socket,
            QUICSocket("127.0.0.1") as client_socket,
            trio.open_nursery() as nursery,
        ):
            QUICServer(server_socket, tls_identity("server"))
            client = QUICClient(client_socket, tls_identity("client"))
            gate = Gate(server_socket.local_address)
            await nursery.start(gate.run)
            with trio.move_on_after(0.5):
                await client.connect(gate.address)
            assert gate.seen, "the Initial never left"
            assert max(gate.seen.values()) == 1
            nursery.cancel_scope.cancel()


async def test_stray_watch_reports_where_noise_comes_from() -> None:
    with trio.fail_after(10):
        async with QUICSocket("::") as sock:
            port = sock.local_address[1]
            noise = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            try:
                with sock.watch_strays("127.0.0.1") as watch:
                    noise[0].sendto(random.randbytes(32), ("127.0.0.1", port))
                    first = await watch.wait_source(0)
                    assert first == ("127.0.0.1", noise[0].getsockname()[1])
                    noise[0].sendto(random.randbytes(32), ("127.0.0.1", port))
                    noise[1].sendto(random.randbytes(32), ("127.0.0.1", port))
                    second = await watch.wait_source(1)
                    assert second == ("127.0.0.1", noise[1].getsockname()[1])
                    assert watch.sources == [first, second]
                    with sock.watch_strays("192.0.2.1") as other:
                        noise[1].sendto(random.randbytes(32), ("127.0.0.1", port))
                        await trio.sleep(0.05)
                        assert other.sources == []
                # Random bytes may look like a short header for nobody, or a
                # long header of a version nobody speaks.
                stats = sock.statistics
                assert (
                    stats.dropped_not_quic
                    + stats.dropped_unknown_connection
                    + stats.dropped_short_unknown_version
                ) == 4
            finally:
                for s in noise:
                    s.close()


def test_spray_delays_are_short_at_first_then_back_off() -> None:
    delays = spray_delays(random.Random(1))
    fast = []
    elapsed = 0.0
    while elapsed < 1.0:
        delay = next(delays)
        fast.append(delay)
        elapsed += delay
    assert all(0.010 <= d <= 0.050 for d in fast)
    assert len(fast) >= 20
    slow = [next(delays) for _ in range(10)]
    assert slow[0] <= 0.125
    assert max(slow) <= 1.25
    assert slow[-1] >= 0.75
