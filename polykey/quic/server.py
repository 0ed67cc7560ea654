"""Accepting QUIC connections on a :class:`~polykey.quic.QUICSocket`.

A new client's Initial reaches :meth:`QUICServer.handle_initial` from the
socket's reader. With Retry on (the default, as js-quic does it) the first
Initial is answered statelessly with a Retry carrying a token: an HMAC over
the client's address and original destination id, with a timestamp, under a
key that lives only in this server. Only a client that echoes a valid token
from the same address gets a connection, so spoofed sources cost us one
small packet, not a TLS handshake.

A connection is handed to :meth:`accept` only once its handshake is done and
the peer's certificate chain passed the verifier. Connections waiting to be
accepted are bounded (``accept_backlog``); past it new clients are dropped
(they retry) rather than queued without limit.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from . import _binding
from ._binding import Address
from .config import PeerVerifier, QUICConfig, TLSIdentity
from .connection import QUICConnection
from .errors import QuicheError
from .socket import CID_LEN, QUICSocket

__all__ = ["QUICServer", "ServerStatistics"]

_TOKEN_LIFETIME_MS: Final = 10_000
_MAC_LEN: Final = 16


@attrs.define
class ServerStatistics:
    """Counters of a :class:`QUICServer`; each refusal has its own."""

    retries_sent: int = 0
    version_negotiations_sent: int = 0
    #: Datagrams under 1200 bytes naming a version we do not speak: dropped
    #: unanswered (RFC 9000 5.2.2), so the server reflects nothing small.
    short_unknown_version: int = 0
    #: Tokens that failed their MAC, expired or came from another address.
    bad_tokens: int = 0
    #: New clients dropped because ``accept_backlog`` was full.
    refused_backlog: int = 0
    #: Initials of a supported version in datagrams under 1200 bytes.
    short_initials: int = 0
    accepted: int = 0
    handshakes_failed: int = 0


class QUICServer(trio.abc.Listener[QUICConnection]):
    """Accepts verified connections arriving on ``socket``.

    ``verifier`` checks each client's certificate chain (required: clients
    must present one). Use it as a listener (``await server.accept()``) or
    run ``await server.serve(handler)``.
    """

    def __init__(
        self,
        socket: QUICSocket,
        identity: TLSIdentity,
        *,
        config: QUICConfig | None = None,
        verifier: PeerVerifier | None = None,
    ) -> None:
        self._socket = socket
        self._config = config or QUICConfig()
        self._binding_config = self._config.binding_config(identity, server=True)
        self._verifier = verifier
        self._key = os.urandom(32)
        self._ready: collections.deque[QUICConnection] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._handshaking = 0
        self._closed = False
        self.statistics = ServerStatistics()
        socket.attach_server(self)

    @property
    def socket(self) -> QUICSocket:
        return self._socket

    # -- tokens -------------------------------------------------------------------

    def _mac(self, stamp: bytes, odcid: bytes, address: Address) -> bytes:
        message = stamp + odcid + repr(tuple(address[:2])).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_LEN]

    def _mint_token(self, odcid: bytes, address: Address) -> bytes:
        stamp = struct.pack("!Q", int(time.monotonic() * 1000))
        return stamp + bytes([len(odcid)]) + odcid + self._mac(stamp, odcid, address)

    def _check_token(self, token: bytes, address: Address) -> bytes | None:
        """The original DCID the token vouches for, or None."""
        if len(token) < 9 + _MAC_LEN:
            return None
        stamp, length = token[:8], token[8]
        odcid = token[9 : 9 + length]
        mac = token[9 + length :]
        if len(odcid) != length or len(mac) != _MAC_LEN:
            return None
        if not hmac.compare_digest(mac, self._mac(stamp, odcid, address)):
            return None
        age = int(time.monotonic() * 1000) - struct.unpack("!Q", stamp)[0]
        if not 0 <= age <= _TOKEN_LIFETIME_MS:
            return None
        return odcid

    # -- new connections ------------------------------------------------------------

    def handle_initial(
        self, header: _binding.Header, data: memoryview, address: Address
    ) -> None:
        """Called by the socket for an Initial to an unknown connection id, or
        any long header naming a version we do not speak."""
        if self._closed:
            return
        stats = self.statistics
        send = self._socket.send_segments
        if not _binding.version_is_supported(header.version):
            if len(data) < _binding.MIN_CLIENT_INITIAL_LEN:
                # RFC 9000 5.2.2: no VN for a datagram too small to start a
                # connection, or we answer 8 spoofed bytes with 11.
                stats.short_unknown_version += 1
                return
            packet = _binding.negotiate_version(header.scid, header.dcid)
            send(memoryview(packet), len(packet), address)
            stats.version_negotiations_sent += 1
            return
        if len(data) < _binding.MIN_CLIENT_INITIAL_LEN:
            stats.short_initials += 1
            return
        if len(self._ready) + self._handshaking >= self._config.accept_backlog:
            stats.refused_backlog += 1
            return
        odcid: bytes | None = None
        scid = os.urandom(CID_LEN)
        if self._config.retry:
            if not header.token:
                token = self._mint_token(header.dcid, address)
                packet = _binding.retry(
                    header.scid, header.dcid, scid, token, header.version
                )
                send(memoryview(packet), len(packet), address)
                stats.retries_sent += 1
                return
            odcid = self._check_token(header.token, address)
            if odcid is None or len(header.dcid) != CID_LEN:
                stats.bad_tokens += 1
                return
            scid = header.dcid
        try:
            q = _binding.Connection.accept(
                self._binding_config, scid, odcid, self._socket.local_address, address
            )
        except (QuicheError, ValueError):
            stats.handshakes_failed += 1
            return
        conn = QUICConnection(
            self._socket,
            q,
            is_server=True,
            config=self._config,
            verifier=self._verifier,
            remote_address=address,
        )
        self._socket._route(scid, conn)
        if odcid is None:
            # Until the client switches to our id it keeps using its own.
            self._socket._route(header.dcid, conn)
        self._handshaking += 1
        conn._on_ready.append(self._connection_ready)
        self._socket.nursery.start_soon(self._watch_handshake, conn)
        conn._start(self._config.handshake_timeout)
        conn._datagram(data, address)

    async def _watch_handshake(self, conn: QUICConnection) -> None:
        # Keeps the handshaking count honest when a handshake fails.
        await conn._handshake_done.wait()
        self._handshaking -= 1
        if not conn._verified:
            self.statistics.handshakes_failed += 1

    def _connection_ready(self, conn: QUICConnection) -> None:
        if self._closed:
            conn._close_now(is_app=True, code=0, reason=b"server closed")
            return
        self.statistics.accepted += 1
        self._ready.append(conn)
        self._lot.unpark()

    # -- the listener API -------------------------------------------------------------

    async def accept(self) -> QUICConnection:
        """The next verified connection."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the server is closed")
            while self._ready:
                conn = self._ready.popleft()
                if not conn.closed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return conn
            await self._lot.park()

    async def serve(
        self,
        handler: Callable[[QUICConnection], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``handler(conn)`` for every connection, each in its own task;
        the connection is closed when its handler returns."""

        async def run(conn: QUICConnection) -> None:
            async with conn:
                await handler(conn)

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn = await self.accept()
                except trio.ClosedResourceError:
                    return
                nursery.start_soon(run, conn)

    async def aclose(self) -> None:
        """Stop accepting; close connections that were never accepted."""
        if not self._closed:
            self._closed = True
            self._socket.attach_server(None)
            while self._ready:
                self._ready.popleft()._close_now(
                    is_app=True, code=0, reason=b"server closed"
                )
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()
