"""QUIC through a seeded lossy relay: loss, duplication, reordering, delay."""

from __future__ import annotations

import hashlib
import random

import attrs
import pytest
import trio

from polykey.quic import (
    CloseKind,
    QUICConfig,
    QUICConnection,
    QUICServer,
    QUICSocket,
    QUICStream,
)
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


@attrs.define
class _Echoed:
    """One echoed stream's progress at the server, for a stall's report."""

    stream: QUICStream
    received: int = 0
    sent: int = 0
    eof: bool = False
    sending: bool = False


def _stream_state(stream: QUICStream) -> str:
    q = stream.connection.quiche
    sid = stream.stream_id
    try:
        capacity: int | str = q.stream_capacity(sid)
    except Exception as exc:  # a closed or stopped stream: say which
        capacity = type(exc).__name__
    return (
        f"stream {sid}: readable {q.stream_readable(sid)}, "
        f"finished {q.stream_finished(sid)}, capacity {capacity}"
    )


def _conn_state(conn: QUICConnection) -> str:
    stats = conn.statistics()
    return (
        f"closed {conn.closed}, quiche timeout {conn.quiche.timeout()}, "
        f"{stats.quiche}, {stats.path}, datagrams_in {stats.datagrams_in}, "
        f"timer_fires {stats.timer_fires}, flushes {stats.flushes}, "
        f"send_blocked {stats.send_blocked}, streams_open {stats.streams_open}"
    )


def _stall_report(
    relay: LossyUDPRelay,
    client: QUICConnection,
    stream: QUICStream,
    received: int,
    sent_all: bool,
    server: list[QUICConnection],
    echoed: list[_Echoed],
) -> str:
    """Which side stopped: a stall under loss was seen once in CI (a 4 MiB
    echo waiting 60 s for the echo's end) and never reproduced since."""
    lines = [
        f"relay: {relay.statistics}",
        f"client: {_conn_state(client)}",
        f"client {_stream_state(stream)}; received {received}, sent all {sent_all}",
    ]
    lines += [f"server: {_conn_state(conn)}" for conn in server]
    lines += [
        f"server {_stream_state(e.stream)}; received {e.received}, sent {e.sent}, "
        f"eof {e.eof}, in send_all {e.sending}"
        for e in echoed
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", [1, 2])
async def test_transfer_intact_at_five_percent_loss(seed: int) -> None:
    size = 4 * 1024 * 1024
    server_conns: list[QUICConnection] = []
    echoed: list[_Echoed] = []

    async def echo(stream: QUICStream) -> None:
        progress = _Echoed(stream)
        echoed.append(progress)
        async with stream:
            while data := await stream.receive_some():
                progress.received += len(data)
                progress.sending = True
                await stream.send_all(data)
                progress.sending = False
                progress.sent += len(data)
            progress.eof = True
            await stream.send_eof()

    async def serve(conn: QUICConnection) -> None:
        server_conns.append(conn)
        async with trio.open_nursery() as streams:
            while True:
                streams.start_soon(echo, await conn.accept_stream())

    async with (
        QUICSocket("127.0.0.1") as ss,
        QUICSocket("127.0.0.1") as cs,
        trio.open_nursery() as nursery,
    ):
        server = QUICServer(ss, tls_identity("server"))
        nursery.start_soon(server.serve, serve)
        relay = LossyUDPRelay(
            ss.local_address, seed=seed, drop=0.05, duplicate=0.02, delay=0.05
        )
        await nursery.start(relay.run)
        conn = await _through_relay(relay, cs)
        rng = random.Random(seed)
        payload = rng.randbytes(size)
        stream = await conn.open_stream()
        received = bytearray()
        sent_all = False

        async def send() -> None:
            nonlocal sent_all
            await stream.send_all(payload)
            await stream.send_eof()
            sent_all = True

        report = ""

        async def watchdog(
            transfer: trio.CancelScope,
            task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            # The state is taken before cancelling: cancelled, the client's
            # send resets its stream.
            nonlocal report
            with trio.CancelScope() as watch:
                task_status.started(watch)
                await trio.sleep(60)
                report = _stall_report(
                    relay, conn, stream, len(received), sent_all, server_conns, echoed
                )
                transfer.cancel()

        async with trio.open_nursery() as transfer:
            watch = await transfer.start(watchdog, transfer.cancel_scope)
            transfer.start_soon(send)
            while data := await stream.receive_some():
                received += data
            watch.cancel()
        if report:
            pytest.fail(f"the echo stalled:\n{report}")
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
