"""Shared helpers of the QUIC tests: identities and a connected pair."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from polykey.quic import (
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICServer,
    QUICSocket,
    QUICStream,
    TLSIdentity,
)


def plain_identity(name: str, *, kind: str = "ed25519") -> tuple[bytes, bytes]:
    """A self-signed certificate (DER) and key (PKCS8 DER) that is not a
    node certificate: enough for binding tests that do not verify peers."""
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        algorithm = None
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        from cryptography.hazmat.primitives import hashes

        algorithm = hashes.SHA256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return (
        cert.public_bytes(serialization.Encoding.DER),
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def tls_identity(name: str) -> TLSIdentity:
    cert, key = plain_identity(name)
    return TLSIdentity(cert_chain=[cert], private_key=key)


class QUICPair:
    """Two sockets on loopback: a server on one, a client on the other."""

    def __init__(
        self,
        server_socket: QUICSocket,
        client_socket: QUICSocket,
        server: QUICServer,
        client: QUICClient,
    ) -> None:
        self.server_socket = server_socket
        self.client_socket = client_socket
        self.server = server
        self.client = client

    async def connect(self) -> tuple[QUICConnection, QUICConnection]:
        with trio.fail_after(5):
            client_conn = await self.client.connect(self.server_socket.local_address)
            server_conn = await self.server.accept()
        return client_conn, server_conn

    async def stream_pair(
        self, client_conn: QUICConnection, server_conn: QUICConnection
    ) -> tuple[QUICStream, QUICStream]:
        """A client stream and its server side (made known by one byte)."""
        with trio.fail_after(5):
            cs = await client_conn.open_stream()
            await cs.send_all(b"\x00")
            ss = await server_conn.accept_stream()
            assert await ss.receive_some(1) == b"\x00"
        return cs, ss


@contextlib.asynccontextmanager
async def open_pair(
    config: QUICConfig | None = None,
    *,
    server_config: QUICConfig | None = None,
    client_config: QUICConfig | None = None,
) -> AsyncIterator[QUICPair]:
    async with QUICSocket("127.0.0.1") as ss, QUICSocket("127.0.0.1") as cs:
        server = QUICServer(ss, tls_identity("server"), config=server_config or config)
        client = QUICClient(cs, tls_identity("client"), config=client_config or config)
        yield QUICPair(ss, cs, server, client)


class Gate:
    """A UDP forwarder standing in for a NAT that drops what arrives before
    it opens: client -> server datagrams are dropped until ``opened`` is
    set; replies always pass. Counts each distinct datagram it saw."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.opened = trio.Event()
        self.seen: dict[bytes, int] = {}
        self.dropped = 0
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        outer = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        inner = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await outer.bind(("127.0.0.1", 0))
        await inner.bind(("127.0.0.1", 0))
        self.address = outer.getsockname()
        client: list[tuple[str, int]] = []
        with outer, inner:
            async with trio.open_nursery() as nursery:

                async def inbound() -> None:
                    while True:
                        data, source = await outer.recvfrom(65536)
                        client[:] = [source]
                        self.seen[data] = self.seen.get(data, 0) + 1
                        if self.opened.is_set():
                            await inner.sendto(data, self.target)
                        else:
                            self.dropped += 1

                async def outbound() -> None:
                    while True:
                        data, _ = await inner.recvfrom(65536)
                        if client:
                            await outer.sendto(data, client[0])

                nursery.start_soon(inbound)
                nursery.start_soon(outbound)
                task_status.started()
