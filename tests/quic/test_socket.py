"""QUICSocket: address families, GSO/GRO fallback, version negotiation."""

from __future__ import annotations

import math
import os
import socket
import struct

import pytest
import trio

import polykey.quic._socket as quic_socket
from polykey.quic import QUICClient, QUICServer, QUICSocket
from polykey.quic._binding import PacketType, parse_header

from .helpers import open_pair, tls_identity
from .test_loopback import echo_streams


async def _echo_once(
    server_host: str, client_host: str, target: tuple[str, int]
) -> None:
    async with (
        QUICSocket(server_host) as ss,
        QUICSocket(client_host) as cs,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(ss, tls_identity("server"))
        nursery.start_soon(server.serve, echo_streams)
        client = QUICClient(cs, tls_identity("client"))
        with trio.fail_after(10):
            conn = await client.connect((target[0], ss.local_address[1]))
            stream = await conn.open_stream()
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await stream.receive_some() == b"ping"
        nursery.cancel_scope.cancel()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
async def test_ipv6_both_ends() -> None:
    await _echo_once("::1", "::1", ("::1", 0))


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
async def test_dual_stack_sockets_talk_ipv4() -> None:
    # Both sockets bound to "::" (the node default); the peer is dialled by
    # its IPv4 address, which travels as IPv4-mapped IPv6.
    await _echo_once("::", "::", ("127.0.0.1", 0))


async def test_without_gso_and_gro(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic_socket, "_probe_gso", lambda sock: False)
    monkeypatch.setattr(quic_socket, "_enable_gro", lambda sock: False)
    async with (
        QUICSocket("127.0.0.1") as ss,
        QUICSocket("127.0.0.1") as cs,
        trio.open_nursery() as nursery,
    ):
        assert not ss.statistics.gso
        assert not cs.statistics.gro
        server = QUICServer(ss, tls_identity("server"))
        nursery.start_soon(server.serve, echo_streams)
        client = QUICClient(cs, tls_identity("client"))
        payload = os.urandom(8 * 1024 * 1024)
        received = bytearray()
        with trio.fail_after(30):
            conn = await client.connect(ss.local_address)
            stream = await conn.open_stream()

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async with trio.open_nursery() as transfer:
                transfer.start_soon(send)
                while data := await stream.receive_some():
                    received += data
        assert received == payload
        nursery.cancel_scope.cancel()


def _unknown_version(dcid: bytes, scid: bytes, size: int, first: int = 0xC0) -> bytes:
    packet = (
        bytes([first])
        + struct.pack("!I", 0x1A2A3A4A)  # a version nobody speaks
        + bytes([len(dcid)]) + dcid
        + bytes([len(scid)]) + scid
    )  # fmt: skip
    return packet + b"\x00" * (size - len(packet))


@pytest.mark.parametrize(
    "first",
    [
        0xC0,  # an Initial's type bits in v1
        0xD0,  # QUIC v2's Initial (0-RTT's type bits in v1)
    ],
)
async def test_unsupported_version_gets_version_negotiation(first: int) -> None:
    async with QUICSocket("127.0.0.1") as ss:
        server = QUICServer(ss, tls_identity("server"))
        raw = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with raw:
            await raw.bind(("127.0.0.1", 0))
            dcid, scid = os.urandom(8), os.urandom(8)
            await raw.sendto(
                _unknown_version(dcid, scid, 1200, first), ss.local_address
            )
            with trio.fail_after(5):
                answer, _ = await raw.recvfrom(2048)
        header = parse_header(answer, 8)
        assert header.type is PacketType.VERSION_NEGOTIATION
        assert header.dcid == scid
        assert header.scid == dcid
        assert server.statistics.version_negotiations_sent == 1


async def test_small_datagram_of_unknown_version_gets_no_answer() -> None:
    # RFC 9000 5.2.2: a server drops datagrams under 1200 bytes naming a
    # version it does not speak; answering makes it a reflector (8 spoofed
    # bytes in, 11 out).
    async with QUICSocket("127.0.0.1") as ss:
        server = QUICServer(ss, tls_identity("server"))
        raw = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with raw:
            await raw.bind(("127.0.0.1", 0))
            sizes = [8, 100, 1199]
            for size in sizes:
                await raw.sendto(_unknown_version(b"", b"", size), ss.local_address)
            await raw.sendto(_unknown_version(b"", b"", 1200), ss.local_address)
            with trio.fail_after(5):
                answer, _ = await raw.recvfrom(2048)
            # The only answer is the 1200-byte datagram's.
            assert parse_header(answer, 8).type is PacketType.VERSION_NEGOTIATION
            with trio.move_on_after(0.3):
                extra, _ = await raw.recvfrom(2048)
                pytest.fail(f"a second answer: {extra!r}")
        assert ss.statistics.dropped_short_unknown_version == len(sizes)
        assert server.statistics.version_negotiations_sent == 1
        assert ss.statistics.datagrams_sent == 1


async def test_initial_without_server_is_dropped_and_counted() -> None:
    async with QUICSocket("127.0.0.1") as lonely, QUICSocket("127.0.0.1") as cs:
        client = QUICClient(cs, tls_identity("client"))
        with trio.move_on_after(0.3):
            await client.connect(lonely.local_address)
        assert lonely.statistics.dropped_no_server >= 1
        assert cs.statistics.connections == 0


async def test_a_socket_opens_once() -> None:
    with trio.fail_after(5):
        sock = QUICSocket("127.0.0.1")
        async with sock:
            pass
        with pytest.raises(RuntimeError, match="opened once"):
            async with sock:
                pass  # pragma: no cover - never entered


class _FakeFlushing:
    """Stands for a QUICSocket with deferred flushes due (its one method the
    idle flush calls): records the ``ripe`` bound, and wakes a task."""

    def __init__(self, wake: trio.lowlevel.Task | None = None) -> None:
        self.calls: list[float] = []
        self.wake = wake

    def flush_ripe(self, ripe: float) -> tuple[bool, bool, float]:
        # One mark, made now: flushed (and done) at the idle point only; a
        # flush that wakes a task says it may have (as a real socket's does
        # when the flush ends a connection). It arms no timer.
        self.calls.append(ripe)
        if ripe != math.inf:
            return True, False, math.inf
        if self.wake is not None:
            trio.lowlevel.reschedule(self.wake)
            self.wake = None
            return False, True, math.inf
        return False, False, math.inf


async def test_idle_flush_runs_at_the_idle_point_and_wakes_at_once() -> None:
    """The deferred flushes run in the scheduler step before an I/O poll
    with nothing runnable (ripe = inf: all marks), once per registration;
    a task that a flush wakes runs without waiting out the poll (here 30 s
    of a sleeping task: the test's deadline would fire first)."""
    async with QUICSocket("127.0.0.1"):
        flush = quic_socket._idle_flusher()
        async with QUICSocket("127.0.0.1"):
            assert quic_socket._idle_flusher() is flush  # one per run
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 30)
                idle = _FakeFlushing()
                flush.add(idle)  # type: ignore[arg-type]
                await trio.sleep(0.01)
                assert idle.calls[-1] == math.inf
                assert all(ripe < trio.current_time() for ripe in idle.calls[:-1])
                flushed = len(idle.calls)
                await trio.sleep(0.01)
                assert len(idle.calls) == flushed  # done: no longer called

                waker = _FakeFlushing(trio.lowlevel.current_task())
                await _woken_by_a_flush_at_once(flush, waker)
                assert waker.calls[-1] == math.inf
                nursery.cancel_scope.cancel()


async def _woken_by_a_flush_at_once(flush: object, fake: object) -> None:
    """Give the run's idle flush ``fake`` and wait until a flush wakes this
    task: within a second, not after the poll's timeout (the caller keeps
    a task sleeping 30 s, the only other deadline)."""
    flush.add(fake)  # type: ignore[attr-defined]
    start = trio.current_time()
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
    assert trio.current_time() - start < 1


class _FakeMarking:
    """Stands for a QUICSocket whose deferred flush marks another socket's
    (a relayed connection's packets queued on a carrier of another socket):
    that one is flushed in the next round, which must come at once."""

    def __init__(self, flush: object, other: _FakeFlushing) -> None:
        self.flush = flush
        self.other = other

    def flush_ripe(self, ripe: float) -> tuple[bool, bool, float]:
        if ripe != math.inf:
            return True, False, math.inf
        self.flush.add(self.other)  # type: ignore[attr-defined]
        return False, False, math.inf


async def test_a_flush_that_marks_another_socket_does_not_wait_out_the_poll() -> None:
    async with QUICSocket("127.0.0.1"):
        flush = quic_socket._idle_flusher()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 30)
                other = _FakeFlushing(trio.lowlevel.current_task())
                await _woken_by_a_flush_at_once(flush, _FakeMarking(flush, other))
                assert other.calls[-1] == math.inf
                nursery.cancel_scope.cancel()


class _FakeArming:
    """Stands for a QUICSocket whose deferred flush arms a timer (quiche's
    loss-detection timer, after a send) earlier than any deadline the
    scheduler knew of when it computed its poll's timeout."""

    def __init__(self, scope: trio.CancelScope, delay: float) -> None:
        self.scope = scope
        self.delay = delay

    def flush_ripe(self, ripe: float) -> tuple[bool, bool, float]:
        if ripe != math.inf:
            return True, False, math.inf
        self.scope.deadline = trio.current_time() + self.delay
        return False, False, self.scope.deadline  # moved earlier than none


async def test_a_deadline_an_idle_flush_arms_is_kept() -> None:
    """A flush at the idle point that arms a timer before the poll's
    timeout ends (a retransmission's, in 50 ms, here with a task asleep for
    30 s) has the poll end by then: the scheduler computed its timeout
    before the flush."""
    async with QUICSocket("127.0.0.1"):
        flush = quic_socket._idle_flusher()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 30)
                await trio.sleep(0.01)  # the sleeper is asleep
                with trio.CancelScope() as scope:
                    flush.add(_FakeArming(scope, 0.05))  # type: ignore[arg-type]
                    start = trio.current_time()
                    await trio.sleep_forever()
                assert scope.cancelled_caught
                assert trio.current_time() - start < 1
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("closer", ["client", "server"])
async def test_a_connection_that_ends_wakes_its_waiters_at_once(
    closer: str,
) -> None:
    """Over real sockets: a connection that ends (the peer's close, then
    quiche's draining) wakes whoever waits on it without waiting out a long
    poll (a task sleeping 30 s is the only other deadline: the test's own
    would fire first)."""
    async with open_pair() as pair:
        client_conn, server_conn = await pair.connect()
        closing, waiting = (
            (client_conn, server_conn)
            if closer == "client"
            else (server_conn, client_conn)
        )
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 30)
                start = trio.current_time()
                closing.close(7, b"bye")
                reason = await waiting.wait_closed()
                assert trio.current_time() - start < 1
                assert reason.code == 7
                nursery.cancel_scope.cancel()
