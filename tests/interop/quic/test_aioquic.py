"""Interoperability with aioquic (asyncio, pure Python), both directions.

aioquic_peer.py (next to this file) runs aioquic as a server or a client in
a subprocess of this interpreter, with a Polykey node certificate (Ed25519),
ALPN ``quic`` and an echo on every stream. Each side verifies the other:
our ``node_verifier`` checks aioquic's node certificate, aioquic checks ours
as its trust anchor (client) or reports the leaf it got (server). Both
servers send Retry, so both clients follow one. Real clock throughout.

Skips when aioquic is not installed.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import trio

from polykey.quic import (
    CloseKind,
    QUICConfig,
    QUICServer,
    QUICSocket,
    node_tls_identity,
    node_verifier,
)

from .helpers import (
    HERE,
    Echoes,
    NodeCredentials,
    assert_echoed,
    assert_peer_echoed,
    dial,
    echo_streams,
    run_exchanges,
    spawn_peer,
)

PEER = HERE / "aioquic_peer.py"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        importlib.util.find_spec("aioquic") is None,
        reason="aioquic is not installed (pip install aioquic)",
    ),
]

#: Streams our side opens: empty, tiny, odd, and a few MiB (several
#: flow-control windows of both implementations).
OUR_SIZES = (0, 1, 65_539, 4 * 1024 * 1024 + 5)
#: Streams aioquic opens (aioquic_peer adds the stream's index to the size).
THEIR_STREAMS = 3
THEIR_SIZE = 1024 * 1024

APP_CODE = 42


def peer_args(mode: str, theirs: NodeCredentials) -> list[str]:
    return [
        sys.executable,
        str(PEER),
        mode,
        "--cert",
        str(theirs.cert_path),
        "--key",
        str(theirs.key_path),
    ]


async def test_our_client_against_aioquic_server(
    our_node: NodeCredentials, their_node: NodeCredentials
) -> None:
    args = [
        *peer_args("server", their_node),
        "--push",
        str(THEIR_STREAMS),
        "--push-size",
        str(THEIR_SIZE),
    ]
    their_sizes = [THEIR_SIZE + i for i in range(THEIR_STREAMS)]
    with trio.fail_after(40):
        async with (
            spawn_peer(args, name="aioquic server") as peer,
            QUICSocket("127.0.0.1") as sock,
            trio.open_nursery() as nursery,
        ):
            port = (await peer.expect("listening"))["port"]
            conn = await dial(sock, port, our_node, their_node)
            echoes = Echoes()
            nursery.start_soon(echo_streams, conn, echoes)

            connected = await peer.expect("connected")
            assert connected["alpn"] == "quic"
            # aioquic checked our Ed25519 CertificateVerify against this leaf.
            assert connected["peer_leaf"] == our_node.leaf_der.hex()

            results = await run_exchanges(conn, OUR_SIZES)
            for result, size in zip(results, sorted(OUR_SIZES), strict=True):
                assert_echoed(result, size)
            assert_peer_echoed(
                await peer.expect_all("echoed", len(OUR_SIZES)), OUR_SIZES
            )

            await peer.expect("done")
            pushed = peer.named("stream")
            assert sorted(e["sent"] for e in pushed) == their_sizes
            for event in pushed:
                assert event["stream"] % 4 == 1  # server-initiated bidi
                assert_echoed(event, event["sent"])
            assert await echoes.wait_for(THEIR_STREAMS) == their_sizes

            await conn.aclose(APP_CODE, b"bye from polykey")
            closed = await peer.expect("closed")
            assert closed == {
                "event": "closed",
                "kind": "peer",
                "is_app": True,
                "code": APP_CODE,
                "reason": "bye from polykey",
            }
            nursery.cancel_scope.cancel()


async def test_aioquic_client_against_our_server(
    our_node: NodeCredentials, their_node: NodeCredentials
) -> None:
    their_sizes = [THEIR_SIZE + i for i in range(THEIR_STREAMS)]
    with trio.fail_after(40):
        async with QUICSocket("127.0.0.1") as sock, trio.open_nursery() as nursery:
            # Retry always, so that the peer's handling of it is tested.
            server = QUICServer(
                sock,
                node_tls_identity(our_node.identity),
                config=QUICConfig(retry_threshold=0),
                verifier=node_verifier(),
            )
            args = [
                *peer_args("client", their_node),
                "--ca",
                str(our_node.leaf_path),
                "--port",
                str(sock.local_address[1]),
                "--streams",
                str(THEIR_STREAMS),
                "--size",
                str(THEIR_SIZE),
            ]
            async with spawn_peer(args, name="aioquic client") as peer:
                conn = await server.accept()
                # aioquic followed our Retry and presented its node certificate.
                assert server.statistics.retries_sent == 1
                assert conn.peer_identity == their_node.identity.node_id
                connected = await peer.expect("connected")
                assert connected["alpn"] == "quic"
                assert connected["peer_leaf"] == our_node.leaf_der.hex()

                echoes = Echoes()
                nursery.start_soon(echo_streams, conn, echoes)
                results = await run_exchanges(conn, OUR_SIZES)
                for result, size in zip(results, sorted(OUR_SIZES), strict=True):
                    assert_echoed(result, size)
                    assert result.stream_id % 4 == 1  # server-initiated bidi

                await peer.expect("done")
                streams = peer.named("stream")
                assert sorted(e["sent"] for e in streams) == their_sizes
                for event in streams:
                    assert event["stream"] % 4 == 0
                    assert_echoed(event, event["sent"])
                assert await echoes.wait_for(THEIR_STREAMS) == their_sizes
                assert_peer_echoed(
                    await peer.expect_all("echoed", len(OUR_SIZES)), OUR_SIZES
                )

                await peer.command("close 7 bye from aioquic")
                reason = await conn.wait_closed()
                assert reason.kind is CloseKind.PEER
                assert reason.is_app
                assert reason.code == 7
                assert reason.reason == b"bye from aioquic"
                await peer.expect("stopped")
            nursery.cancel_scope.cancel()
