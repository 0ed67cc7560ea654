"""The stream limit biting over real sockets: a peer that opens more streams
than the node allows is closed by quiche with STREAM_LIMIT_ERROR, counted in
``refused_streams`` (and on /metrics), while a well-behaved peer's calls go
on. quiche will not break the limit itself, so the rule breaker is aioquic
(pure Python, sans-IO, driven here from trio over a UDP socket), told the
node allows more than it said."""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey._metrics import render_metrics
from polykey.agent import NodeLimits, NodeSettings, PolykeyNode
from polykey.keys import NodeIdentity
from polykey.nodes import request_ping
from polykey.quic import TransportErrorCode
from polykey.rpc import CallContext, UnaryHandler

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("aioquic") is None, reason="aioquic is not installed"
)

STREAM_LIMIT_ERROR = TransportErrorCode.STREAM_LIMIT_ERROR
LIMIT = 4


class Slow(UnaryHandler[Any, Any]):
    """Holds its stream a while, so that calls pile up against the limit."""

    async def handle(self, params: Any, ctx: CallContext) -> Any:
        await trio.sleep(0.05)
        return {"ok": True}


async def break_the_limit(
    identity: NodeIdentity, address: tuple[str, int], *, streams: int, uni: bool
) -> int | None:
    """Connect with ``identity``'s certificate, then open ``streams`` streams
    as if the node allowed any number; the error code the node closed the
    connection with (None: it did not, within 2 s of that)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    chain = [x509.load_der_x509_certificate(c) for c in identity.cert_chain_der()]
    config = QuicConfiguration(
        is_client=True, alpn_protocols=["quic"], verify_mode=ssl.CERT_NONE
    )
    config.certificate = chain[0]
    config.certificate_chain = chain[1:]
    config.private_key = load_der_private_key(identity.private_key_der(), None)
    quic = QuicConnection(configuration=config)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    quic.connect(address, now=trio.current_time())
    opened = False
    with sock, trio.move_on_after(10) as scope:
        while True:
            for data, to in quic.datagrams_to_send(now=trio.current_time()):
                await sock.sendto(data, to)
            timer = quic.get_timer()
            wake = timer if timer is not None else trio.current_time() + 1
            with trio.move_on_at(wake):
                data, source = await sock.recvfrom(65536)
                quic.receive_datagram(data, source, now=trio.current_time())
            if timer is not None and trio.current_time() >= timer:
                quic.handle_timer(now=trio.current_time())
            while (event := quic.next_event()) is not None:
                if isinstance(event, ConnectionTerminated):
                    return event.error_code
                if isinstance(event, HandshakeCompleted) and not opened:
                    opened = True
                    scope.deadline = trio.current_time() + 2
                    # What the node announced, ignored: the rule broken.
                    if uni:
                        quic._remote_max_streams_uni = 1000
                    else:
                        quic._remote_max_streams_bidi = 1000
                    for _ in range(streams):
                        sid = quic.get_next_available_stream_id(is_unidirectional=uni)
                        quic.send_stream_data(sid, b"{", end_stream=False)
    return None


async def test_a_peer_past_the_stream_limit_is_closed_and_counted(
    tmp_path: Path,
) -> None:
    limits = NodeLimits(max_streams=LIMIT)
    settings = NodeSettings(
        state_dir=tmp_path / "a", host="127.0.0.1", port=0, limits=limits,
        handlers={"slow": Slow()},
    )  # fmt: skip
    good = NodeSettings(state_dir=tmp_path / "b", host="127.0.0.1", port=0)
    with trio.fail_after(60):
        async with PolykeyNode(settings) as node, PolykeyNode(good) as peer:
            address = node.address
            conn = await peer.connect(node.node_id, address)
            stats = node.connections.socket.statistics

            # At the limit is fine; one past it closes the connection.
            hostile = NodeIdentity.generate()
            code = await break_the_limit(hostile, address, streams=LIMIT, uni=False)
            assert code is None
            code = await break_the_limit(hostile, address, streams=LIMIT + 1, uni=False)
            assert code == STREAM_LIMIT_ERROR
            # No unidirectional stream is allowed at all.
            assert await break_the_limit(hostile, address, streams=1, uni=True) == (
                STREAM_LIMIT_ERROR
            )

            # Counted once per connection, as it ends (quiche drains first).
            while stats.refused_streams < 2:  # noqa: ASYNC110 - counted at the end
                await trio.sleep(0.05)
            assert stats.refused_streams == 2
            assert 'polykey_quic_refused_total{reason="streams"} 2' in (
                render_metrics(node)
            )

            # The well-behaved peer, on a connection made before, goes on:
            # three times the limit of calls at once wait for their streams.
            async def call() -> None:
                assert await conn.rpc.unary("slow", {}) == {"ok": True}

            async with trio.open_nursery() as nursery:
                for _ in range(3 * LIMIT):
                    nursery.start_soon(call)
            assert await request_ping(conn.rpc)
            assert not conn.connection.closed
            assert stats.refused_streams == 2
