"""Peer verification with Polykey node certificates, over loopback QUIC."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from polykey.keys import NodeId, NodeIdentity
from polykey.quic import (
    CloseKind,
    QUICClient,
    QUICConnectionError,
    QUICServer,
    QUICSocket,
    TLSAlert,
    TLSIdentity,
    TransportErrorCode,
    node_tls_identity,
    node_verifier,
)

from .helpers import tls_identity

CRYPTO_ERROR = TransportErrorCode.CRYPTO_ERROR


async def _serve_once(server: QUICServer, seen: list[object]) -> None:
    conn = await server.accept()
    seen.append(conn.peer_identity)


async def test_mutual_node_verification() -> None:
    server_id = NodeIdentity.generate()
    client_id = NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        server = QUICServer(ss, node_tls_identity(server_id), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(client_id))
        seen: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_once, server, seen)
            with trio.fail_after(5):
                conn = await client.connect(
                    ss.local_address, verifier=node_verifier(server_id.node_id)
                )
        assert conn.peer_identity == server_id.node_id
        assert seen == [client_id.node_id]
        assert len(conn.peer_certificates) == 1


async def test_renewed_chain_walks_to_the_expected_old_node_id() -> None:
    old = NodeIdentity.generate()
    renewed = old.renew()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        QUICServer(ss, node_tls_identity(renewed), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(NodeIdentity.generate()))
        with trio.fail_after(5):
            conn = await client.connect(
                ss.local_address, verifier=node_verifier(old.node_id)
            )
        assert len(conn.peer_certificates) == 2
        assert conn.peer_identity == renewed.node_id


async def test_wrong_node_id_is_refused_with_bad_certificate() -> None:
    server_id = NodeIdentity.generate()
    other = NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        QUICServer(ss, node_tls_identity(server_id), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(NodeIdentity.generate()))
        with trio.fail_after(5), pytest.raises(QUICConnectionError) as info:
            await client.connect(
                ss.local_address, verifier=node_verifier(other.node_id)
            )
        reason = info.value.close_reason
        assert reason.kind is CloseKind.VERIFICATION
        assert not reason.is_app
        assert reason.code == CRYPTO_ERROR + TLSAlert.BAD_CERTIFICATE == 298
        assert cs.statistics.connections == 0


def _tampered(identity: NodeIdentity) -> TLSIdentity:
    """The node's certificate with one byte of its node-signature extension
    flipped. TLS never looks at it, so the handshake succeeds; only the check
    after it can notice (the node and issuer signatures no longer hold)."""
    cert = identity.chain.leaf
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    ext = cert.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.2")
    ).value.value  # type: ignore[attr-defined]
    where = bytes(der).find(ext)
    assert where > 0
    der[where + 5] ^= 0xFF
    return TLSIdentity(cert_chain=[bytes(der)], private_key=identity.private_key_der())


async def test_tampered_certificate_is_refused() -> None:
    server_id = NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        QUICServer(ss, _tampered(server_id), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(NodeIdentity.generate()))
        with trio.fail_after(5), pytest.raises(QUICConnectionError) as info:
            await client.connect(
                ss.local_address, verifier=node_verifier(server_id.node_id)
            )
        assert info.value.close_reason.code == CRYPTO_ERROR + TLSAlert.BAD_CERTIFICATE


async def test_expired_client_certificate_is_refused_by_server() -> None:
    server_id = NodeIdentity.generate()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = NodeIdentity.generate(now=long_ago, duration=datetime.timedelta(days=1))
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        server = QUICServer(ss, node_tls_identity(server_id), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(expired))
        with trio.fail_after(5):
            # The client finishes its side of the handshake before the
            # server checks it; then the server's CRYPTO_ERROR closes it.
            try:
                conn = await client.connect(
                    ss.local_address, verifier=node_verifier(server_id.node_id)
                )
            except QUICConnectionError as exc:
                reason = exc.close_reason
            else:
                reason = await conn.wait_closed()
        assert not reason.is_app
        assert reason.code == CRYPTO_ERROR + TLSAlert.CERTIFICATE_EXPIRED == 301
        assert server.statistics.accepted == 0


async def test_plain_certificate_is_not_a_node() -> None:
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        QUICServer(ss, tls_identity("not a node"), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(NodeIdentity.generate()))
        with trio.fail_after(5), pytest.raises(QUICConnectionError) as info:
            await client.connect(ss.local_address, verifier=node_verifier())
        assert info.value.close_reason.kind is CloseKind.VERIFICATION


async def test_verifier_bug_refuses_peer_without_taking_socket_down() -> None:
    def broken(chain: Sequence[bytes]) -> NodeId:
        raise RuntimeError("verifier bug")

    server_id = NodeIdentity.generate()
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        QUICServer(ss, node_tls_identity(server_id), verifier=node_verifier())
        client = QUICClient(cs, node_tls_identity(NodeIdentity.generate()))
        with trio.fail_after(5), pytest.raises(QUICConnectionError):
            await client.connect(ss.local_address, verifier=broken)
        # The same socket still dials fine.
        with trio.fail_after(5):
            conn = await client.connect(
                ss.local_address, verifier=node_verifier(server_id.node_id)
            )
        assert conn.peer_identity == server_id.node_id


def test_verification_cache_respects_validity_and_expected_ids() -> None:
    from polykey.keys import CertificateExpiredError, NodeIdMismatchError
    from polykey.quic._tls import _VerifiedChains

    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    identity = NodeIdentity.generate(now=start, duration=datetime.timedelta(hours=1))
    chain = identity.cert_chain_der()
    cache = _VerifiedChains(capacity=2)
    assert cache.verify(chain, None, now=start) == identity.node_id
    assert cache.verify(chain, None, now=start + datetime.timedelta(minutes=30)) == (
        identity.node_id
    )
    # Cached while valid, refused once expired: the cache never outlives
    # the certificates.
    with pytest.raises(CertificateExpiredError):
        cache.verify(chain, None, now=start + datetime.timedelta(hours=2))
    # A different expected NodeId is a different question.
    other = frozenset({NodeIdentity.generate().node_id})
    with pytest.raises(NodeIdMismatchError):
        cache.verify(chain, other, now=start)
    # Tampered bytes are a different key and fail on their own.
    tampered = [bytes(chain[0][:-1]) + bytes([chain[0][-1] ^ 1])]
    with pytest.raises(Exception, match="signature"):
        cache.verify(tampered, None, now=start)
