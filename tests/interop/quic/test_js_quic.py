"""Interoperability with js-quic (@matrixai/quic 2.0.9), both directions.

js_quic_peer.mjs (next to this file) runs js-quic as a server or a client
with a Polykey node certificate, mutual TLS (``verifyPeer`` with a
``verifyCallback`` pinning our leaf certificate) and an echo on every
stream. js-quic servers always answer with a stateless Retry, and our server
does too, so every connection here follows a Retry. Real clock throughout.

Two js-quic quirks shape js_quic_peer.mjs (it explains both): a plain echo
(FIN after the peer's FIN) now and then loses js-quic's FIN under load, so
every stream runs a length-prefixed echo whose FINs come in a safe order;
and js-quic's default ~208 KiB UDP buffers drop datagrams by the hundred
when node is starved of CPU, so the peer sets 4 MiB on an injected socket.

Skips when node or tests/interop/quic/node_modules is missing (install with
``npm ci`` in tests/interop/quic).
"""

from __future__ import annotations

import shutil

import pytest
import trio

from polykey.keys import NodeIdentity
from polykey.quic import (
    CloseKind,
    QUICClient,
    QUICConfig,
    QUICConnectionError,
    QUICServer,
    QUICSocket,
    TLSAlert,
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

NODE = shutil.which("node")
PEER = HERE / "js_quic_peer.mjs"
JS_QUIC = HERE / "node_modules" / "@matrixai" / "quic"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not JS_QUIC.is_dir(),
        reason="@matrixai/quic is not installed: run `npm ci` in tests/interop/quic",
    ),
]

#: Streams our side opens, by size: empty, tiny, odd, and two MiB (past
#: js-quic's 1 MiB stream window).
OUR_SIZES = (0, 1, 65_539, 2 * 1024 * 1024 + 5)
#: Streams the js-quic side opens (js_quic_peer adds the stream's index).
JS_STREAMS = 4
JS_SIZE = 200_000

APP_CODE = 42


def peer_args(mode: str, theirs: NodeCredentials, ours: NodeCredentials) -> list[str]:
    assert NODE is not None
    return [
        NODE,
        str(PEER),
        mode,
        "--cert",
        str(theirs.cert_path),
        "--key",
        str(theirs.key_path),
        "--peer-cert",
        str(ours.leaf_path),
    ]


async def test_our_client_against_js_quic_server(
    our_node: NodeCredentials, their_node: NodeCredentials
) -> None:
    args = [
        *peer_args("server", their_node, our_node),
        "--push",
        str(JS_STREAMS),
        "--push-size",
        str(JS_SIZE),
    ]
    with trio.fail_after(30):
        async with (
            spawn_peer(args, name="js-quic server") as peer,
            QUICSocket("127.0.0.1") as sock,
            trio.open_nursery() as nursery,
        ):
            port = (await peer.expect("listening"))["port"]
            conn = await dial(sock, port, our_node, their_node)
            echoes = Echoes()
            nursery.start_soon(echo_streams, conn, echoes)

            results = await run_exchanges(conn, OUR_SIZES)
            for result, size in zip(results, sorted(OUR_SIZES), strict=True):
                assert_echoed(result, size)
                assert result.stream_id % 4 == 0  # client-initiated bidi
            connected = await peer.expect("connected")
            assert connected["peer_leaf"] == our_node.leaf_der.hex()
            assert_peer_echoed(
                await peer.expect_all("echoed", len(OUR_SIZES)), OUR_SIZES
            )

            # The server's streams, echoed by us.
            await peer.expect("done")
            pushed = peer.named("stream")
            assert len(pushed) == JS_STREAMS
            for index, event in enumerate(sorted(pushed, key=lambda e: e["sent"])):
                assert event["stream"] % 4 == 1  # server-initiated bidi
                assert_echoed(event, JS_SIZE + index)
            assert await echoes.wait_for(JS_STREAMS) == [
                JS_SIZE + i for i in range(JS_STREAMS)
            ]

            await conn.aclose(APP_CODE, b"bye from polykey")
            closed = await peer.expect("closed")
            assert closed["kind"] == "ErrorQUICConnectionPeer"
            assert closed["is_app"] is True
            assert closed["code"] == APP_CODE
            assert closed["reason"] == "bye from polykey"
            nursery.cancel_scope.cancel()


async def test_js_quic_client_against_our_server(
    our_node: NodeCredentials, their_node: NodeCredentials
) -> None:
    js_sizes = [JS_SIZE + i for i in range(JS_STREAMS)]
    with trio.fail_after(30):
        async with QUICSocket("127.0.0.1") as sock, trio.open_nursery() as nursery:
            # Retry always, so that the peer's handling of it is tested.
            server = QUICServer(
                sock,
                node_tls_identity(our_node.identity),
                config=QUICConfig(retry_threshold=0),
                verifier=node_verifier(),
            )
            args = [
                *peer_args("client", their_node, our_node),
                "--port",
                str(sock.local_address[1]),
                "--streams",
                str(JS_STREAMS),
                "--size",
                str(JS_SIZE),
            ]
            async with spawn_peer(args, name="js-quic client") as peer:
                conn = await server.accept()
                assert conn.peer_identity == their_node.identity.node_id
                assert server.statistics.retries_sent >= 1
                connected = await peer.expect("connected")
                assert connected["peer_leaf"] == our_node.leaf_der.hex()
                assert conn.remote_address[1] == connected["local_port"]

                # "connected" comes once the client listens for our streams.
                echoes = Echoes()
                nursery.start_soon(echo_streams, conn, echoes)
                results = await run_exchanges(conn, OUR_SIZES)
                for result, size in zip(results, sorted(OUR_SIZES), strict=True):
                    assert_echoed(result, size)
                    assert result.stream_id % 4 == 1  # server-initiated bidi

                await peer.expect("done")
                streams = peer.named("stream")
                assert len(streams) == JS_STREAMS
                for event in streams:
                    assert event["stream"] % 4 == 0
                    assert_echoed(event, event["sent"])
                assert sorted(e["sent"] for e in streams) == js_sizes
                assert await echoes.wait_for(JS_STREAMS) == js_sizes
                assert_peer_echoed(
                    await peer.expect_all("echoed", len(OUR_SIZES)), OUR_SIZES
                )

                # The client closes with an application code; we see it.
                await peer.command("close 7 bye from js-quic")
                reason = await conn.wait_closed()
                assert reason.kind is CloseKind.PEER
                assert reason.is_app
                assert reason.code == 7
                assert reason.reason == b"bye from js-quic"
                closed = await peer.expect("closed")
                assert closed["kind"] == "ErrorQUICConnectionLocal"
                assert closed["code"] == 7
            nursery.cancel_scope.cancel()


async def test_our_client_refuses_a_js_quic_server_with_another_node_id(
    our_node: NodeCredentials, their_node: NodeCredentials
) -> None:
    """Pinning another NodeId fails our verification after the handshake;
    js-quic sees our CRYPTO_ERROR (0x100 + bad_certificate)."""
    with trio.fail_after(30):
        async with (
            spawn_peer(
                peer_args("server", their_node, our_node), name="js-quic server"
            ) as peer,
            QUICSocket("127.0.0.1") as sock,
        ):
            port = (await peer.expect("listening"))["port"]
            client = QUICClient(sock, node_tls_identity(our_node.identity))
            with pytest.raises(QUICConnectionError) as info:
                await client.connect(
                    ("127.0.0.1", port),
                    verifier=node_verifier(NodeIdentity.generate().node_id),
                )
            reason = info.value.close_reason
            assert reason.kind is CloseKind.VERIFICATION
            assert reason.code == 0x100 + TLSAlert.BAD_CERTIFICATE
            closed = await peer.expect("closed")
            assert closed["code"] == 0x100 + TLSAlert.BAD_CERTIFICATE
            assert closed["is_app"] is False
