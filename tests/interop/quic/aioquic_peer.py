"""An aioquic peer for polykey's QUIC interop tests (a script, not a module).

    python aioquic_peer.py server --cert C --key K [--push N --push-size S]
    python aioquic_peer.py client --port PORT --cert C --key K --ca LEAF
        [--streams N --size S]

Both modes present the Polykey node certificate chain C with key K (PEM),
ALPN ``quic``, and echo every stream the peer opens. The server sends a Retry to every new client and,
unlike stock aioquic, asks for the client's certificate (see
``_request_client_certificates``). The client verifies the server against
LEAF as its trust anchor, with the server name 127.0.0.1 (a node
certificate names 127.0.0.1 and ::1 among its subjectAltNames).

A server opens --push streams on each connection once the handshake is
done; a client opens --streams streams after connecting. Stream i carries
size + i random bytes; the peer reads the echo until its FIN, ends its own
side and reports both SHA-256 digests (the stream protocol is at ``Peer``).

stdout: one JSON object per line, the same events as js_quic_peer.mjs:
"listening", "connected", "echoed", "stream", "done", "closed". stdin: one
command per line, "close CODE REASON" closes every connection with the
application error CODE. The process exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import ssl
import struct
import sys
from typing import Any

from aioquic import tls
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from cryptography.hazmat.primitives.serialization import Encoding

ALPN = ["quic"]
#: The length prefix of every stream (see Peer).
HEADER = 8


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _request_client_certificates() -> None:
    """aioquic servers never send a CertificateRequest: the switch exists
    only as a private attribute of its TLS context "for test purposes". A
    polykey client presents its certificate only when asked, so turn it on
    for every server-side context in this process."""
    base = tls.Context

    class RequestingContext(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self._is_client:
                self._request_client_certificate = True

    tls.Context = RequestingContext  # type: ignore[misc]


@dataclasses.dataclass
class _Ours:
    """A stream we opened: the payload, and the echo so far."""

    payload: bytes
    digest: Any = dataclasses.field(default_factory=hashlib.sha256)
    received: int = 0


@dataclasses.dataclass
class _Echo:
    """A stream the peer opened: its header, then how much we echoed."""

    header: bytes = b""
    length: int | None = None
    echoed: int = 0
    extra: int = 0


class Peer(QuicConnectionProtocol):
    """Echoes peer streams; runs our own exchanges on request. The stream
    protocol (js_quic_peer.mjs explains the FIN order): the opener sends an
    8-byte big-endian length and that many bytes; the echo ends with a FIN
    as soon as it is complete; the opener ends its side after that FIN."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ours: dict[int, _Ours] = {}
        self._echoes: dict[int, _Echo] = {}
        self._pending_ours = 0
        self._closing_locally = False
        self.push = 0
        self.push_size = 0

    # -- our streams -------------------------------------------------------

    def start_exchanges(self, count: int, size: int) -> None:
        self._pending_ours += count
        for index in range(count):
            stream_id = self._quic.get_next_available_stream_id()
            payload = os.urandom(size + index)
            self._ours[stream_id] = _Ours(payload)
            header = struct.pack("!Q", len(payload))
            self._quic.send_stream_data(stream_id, header + payload)
        self.transmit()

    def _our_data(self, event: StreamDataReceived) -> None:
        ours = self._ours[event.stream_id]
        ours.digest.update(event.data)
        ours.received += len(event.data)
        if not event.end_stream:
            return
        # The echo is complete: end our side too.
        self._quic.send_stream_data(event.stream_id, b"", end_stream=True)
        emit(
            "stream",
            stream=event.stream_id,
            sent=len(ours.payload),
            received=ours.received,
            sent_sha256=hashlib.sha256(ours.payload).hexdigest(),
            received_sha256=ours.digest.hexdigest(),
        )
        self._pending_ours -= 1
        if self._pending_ours == 0:
            emit("done")

    # -- peer streams ------------------------------------------------------

    def _echo_data(self, event: StreamDataReceived) -> None:
        echo = self._echoes.setdefault(event.stream_id, _Echo())
        data = event.data
        if echo.length is None:
            echo.header += data
            if len(echo.header) < HEADER:
                data = b""
            else:
                (echo.length,) = struct.unpack("!Q", echo.header[:HEADER])
                data = echo.header[HEADER:]
                if echo.length == 0:
                    self._quic.send_stream_data(event.stream_id, b"", end_stream=True)
        if echo.length is not None:
            take = min(len(data), echo.length - echo.echoed)
            echo.extra += len(data) - take
            if take:
                echo.echoed += take
                self._quic.send_stream_data(
                    event.stream_id,
                    data[:take],
                    end_stream=echo.echoed == echo.length,
                )
        if event.end_stream:
            emit("echoed", stream=event.stream_id, bytes=echo.echoed, extra=echo.extra)

    # -- events ------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            peer = self._quic.tls._peer_certificate
            emit(
                "connected",
                alpn=event.alpn_protocol,
                peer_leaf=peer.public_bytes(Encoding.DER).hex() if peer else None,
            )
            if not self._quic.configuration.is_client:
                self.start_exchanges(self.push, self.push_size)
        elif isinstance(event, StreamDataReceived):
            if event.stream_id in self._ours:
                self._our_data(event)
            else:
                self._echo_data(event)
        elif isinstance(event, StreamReset):
            emit("reset", stream=event.stream_id, code=event.error_code)
        elif isinstance(event, ConnectionTerminated):
            emit(
                "closed",
                kind="local" if self._closing_locally else "peer",
                is_app=event.frame_type is None,
                code=event.error_code,
                reason=event.reason_phrase,
            )

    def close_with(self, code: int, reason: str) -> None:
        self._closing_locally = True
        self._quic.close(error_code=code, reason_phrase=reason)
        self.transmit()


async def commands(peers: list[Peer]) -> None:
    """Obey stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := await reader.readline():
        command, _, rest = line.decode().strip().partition(" ")
        if command == "close":
            code, _, reason = rest.partition(" ")
            for peer in peers:
                peer.close_with(int(code), reason)
            for peer in peers:
                await peer.wait_closed()
            emit("stopped")


async def run_server(args: argparse.Namespace) -> None:
    _request_client_certificates()
    configuration = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    configuration.load_cert_chain(args.cert, args.key)
    peers: list[Peer] = []

    def create_protocol(*a: Any, **kw: Any) -> Peer:
        peer = Peer(*a, **kw)
        peer.push, peer.push_size = args.push, args.push_size
        peers.append(peer)
        return peer

    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(
            configuration=configuration, create_protocol=create_protocol, retry=True
        ),
        local_addr=(args.host, 0),
    )
    emit("listening", port=transport.get_extra_info("sockname")[1])
    try:
        await commands(peers)
    finally:
        server.close()


async def run_client(args: argparse.Namespace) -> None:
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=ALPN,
        verify_mode=ssl.CERT_REQUIRED,
        server_name=args.host,
    )
    configuration.load_cert_chain(args.cert, args.key)
    configuration.load_verify_locations(cafile=args.ca)
    async with connect(
        args.host, args.port, configuration=configuration, create_protocol=Peer
    ) as peer:
        assert isinstance(peer, Peer)
        peer.start_exchanges(args.streams, args.size)
        await commands([peer])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--push", type=int, default=0)
    parser.add_argument("--push-size", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(run_server(args) if args.mode == "server" else run_client(args))
    except Exception as exc:
        emit("error", where="main", message=f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    main()
