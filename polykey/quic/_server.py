"""Accepting QUIC connections on a :class:`~polykey.quic.QUICSocket`.

A new client's Initial reaches :meth:`QUICServer.handle_initial` from the
socket's reader. With Retry on (the default, as js-quic does it) the first
Initial is answered statelessly with a Retry carrying a token: an HMAC over
the client's address, its original destination id and the id the Retry
tells it to use next, with a timestamp, under a key that lives only in this
server. Only a client that echoes a valid token from the same address, sent
to that id, gets a connection, so spoofed sources cost us one small packet,
not a TLS handshake.

A token admits one connection: the server remembers the tokens it has used
until they expire (10 s, at most ``_MAX_USED_TOKENS``), so one Retry cannot
be replayed into many handshakes. Handshakes in flight are bounded per
address (``max_handshakes_per_address``) and in all (``accept_backlog``,
which also counts connections waiting in :meth:`accept`): one address
cannot take every slot for the handshake timeout.

Beyond that, optional limits of :class:`QUICConfig` (the node sets them,
see ``polykey/quic/_admission.py``): connections held (handshaking or
verified) in all and per address, and new handshakes per second per
address. An "address" is an IPv4 address or an IPv6 /64 throughout.

A connection is handed to :meth:`accept` only once its handshake is done and
the peer's certificate chain passed the verifier. Past a limit new clients
are dropped (they retry) rather than queued without limit; every refusal is
counted in :class:`ServerStatistics`.

:meth:`QUICServer.serve` runs a task per connection; ``serve_streams``
one per stream and none per connection, so that an idle connection costs no
task.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from . import _binding
from ._address import SockAddr
from ._admission import Admission, AdmissionLimits, Refusal, address_key
from ._config import PeerVerifier, QUICConfig, TLSIdentity
from ._connection import QUICConnection
from ._errors import QuicheError
from ._socket import CID_LEN, QUICSocket
from ._stream import QUICStream

__all__ = ["CLOSE_HANDLER_FAILED", "QUICServer", "ServerStatistics"]

#: The application error code :meth:`QUICServer.serve` closes a connection
#: with when its handler raised (a bug of the handler's, not the peer's).
#: Applications pick their own codes; polykey.nodes uses 0x1-0x4.
CLOSE_HANDLER_FAILED: Final = 0x10

_TOKEN_LIFETIME_MS: Final = 10_000
_MAC_LEN: Final = 16
# stamp (8), odcid length (1), odcid, the Retry's scid (CID_LEN), MAC.
_TOKEN_MIN_LEN: Final = 9 + CID_LEN + _MAC_LEN
#: Used tokens remembered at most (16 bytes each, kept 10 s): more than the
#: server can admit in a token's lifetime. When full, tokens are refused.
_MAX_USED_TOKENS: Final = 65_536

_log = logging.getLogger("polykey.quic")


@attrs.define
class ServerStatistics:
    """Counters of a :class:`QUICServer`; each refusal has its own."""

    retries_sent: int = 0
    #: New clients accepted without a Retry (the server was below both
    #: retry thresholds).
    unvalidated_handshakes: int = 0
    version_negotiations_sent: int = 0
    #: Tokens that are malformed, forged or from another address.
    bad_tokens: int = 0
    #: Tokens older than their 10 s lifetime.
    expired_tokens: int = 0
    #: Valid tokens sent to a connection id other than the one their Retry
    #: named.
    token_dcid_mismatch: int = 0
    #: Tokens that had already admitted a connection.
    reused_tokens: int = 0
    #: Valid tokens refused because the used-token memory was full.
    refused_token_memory: int = 0
    #: New clients dropped because ``accept_backlog`` was full.
    refused_backlog: int = 0
    #: New clients dropped because their address (IPv4, or IPv6 /64)
    #: already had ``max_handshakes_per_address`` handshakes in flight.
    refused_address_limit: int = 0
    #: New clients dropped because ``max_connections`` were held.
    refused_connections: int = 0
    #: New clients dropped because their address (IPv4, or IPv6 /64) held
    #: ``max_connections_per_address``.
    refused_connections_per_address: int = 0
    #: New clients dropped because their address started handshakes faster
    #: than ``handshake_rate`` allows.
    refused_handshake_rate: int = 0
    #: Connections held now (handshaking or verified), once admitted.
    connections: int = 0
    #: Initials of a supported version in datagrams under 1200 bytes.
    short_initials: int = 0
    #: Connections created for new clients (each a handshake in flight).
    handshakes_started: int = 0
    #: Handshakes in flight now.
    handshaking: int = 0
    accepted: int = 0
    handshakes_failed: int = 0
    #: Handlers of :meth:`QUICServer.serve_streams` or :meth:`QUICServer.serve`
    #: that raised (anything but BrokenResourceError): each logged at WARNING
    #: with the peer, its stream reset or its connection closed.
    handler_errors: int = 0


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _host(conn: QUICConnection) -> str:
    """The address (see _admission) ``conn``'s handshake and connection
    were counted under."""
    return address_key(str(conn.remote_address[0]))


def _peer(conn: QUICConnection) -> str:
    peer = f"{conn.remote_address[0]}:{conn.remote_address[1]}"
    if conn.peer_identity is not None:
        peer = f"{conn.peer_identity} at {peer}"
    return peer


def _count_refusal(stats: ServerStatistics, refusal: Refusal) -> None:
    if refusal is Refusal.CONNECTIONS:
        stats.refused_connections += 1
    elif refusal is Refusal.CONNECTIONS_PER_ADDRESS:
        stats.refused_connections_per_address += 1
    else:
        stats.refused_handshake_rate += 1


class QUICServer(trio.abc.Listener[QUICConnection]):
    """Accepts verified connections arriving on ``socket``.

    ``verifier`` checks each client's certificate chain (required: clients
    must present one). Use it as a listener (``await server.accept()``), or
    run ``await server.serve(handler)`` (a handler per connection) or
    ``await server.serve_streams(handler)`` (a handler per stream).
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
        # Handshakes in flight per IP address.
        self._per_address: collections.Counter[str] = collections.Counter()
        # MAC of each token that admitted a connection -> when it may be
        # forgotten (ms); in insertion order, so also in that order.
        self._used_tokens: dict[bytes, int] = {}
        config = self._config
        self._admission = Admission(
            AdmissionLimits(
                max_connections=config.max_connections,
                max_connections_per_address=config.max_connections_per_address,
                handshake_rate=config.handshake_rate,
                handshake_burst=config.handshake_burst,
            )
        )
        self._closed = False
        self.statistics = ServerStatistics()
        # Bound once: every connection keeps these two objects.
        self._verified_callback = self._verified
        self._finished_callback = self._connection_over
        socket.attach_server(self)

    @property
    def socket(self) -> QUICSocket:
        return self._socket

    # -- tokens -------------------------------------------------------------------

    def _mac(self, body: bytes, address: SockAddr) -> bytes:
        message = body + repr(tuple(address[:2])).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_LEN]

    def _mint_token(self, odcid: bytes, scid: bytes, address: SockAddr) -> bytes:
        """A token for a client at ``address`` whose first Initial went to
        ``odcid``, told by our Retry to use ``scid`` next."""
        stamp = struct.pack("!Q", _now_ms())
        body = stamp + bytes([len(odcid)]) + odcid + scid
        return body + self._mac(body, address)

    def _check_token(
        self, token: bytes, dcid: bytes, address: SockAddr
    ) -> tuple[bytes, bytes] | None:
        """The original DCID and MAC of a token that may admit a connection
        from ``address`` sent to ``dcid``; None (counted) if it may not."""
        stats = self.statistics
        if len(token) < _TOKEN_MIN_LEN or len(token) != _TOKEN_MIN_LEN + token[8]:
            stats.bad_tokens += 1
            return None
        body, mac = token[:-_MAC_LEN], token[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(body, address)):
            stats.bad_tokens += 1
            return None
        now = _now_ms()
        if not 0 <= now - struct.unpack("!Q", body[:8])[0] <= _TOKEN_LIFETIME_MS:
            stats.expired_tokens += 1
            return None
        if not hmac.compare_digest(body[-CID_LEN:], dcid):
            # Else one token would admit a connection per fresh DCID.
            stats.token_dcid_mismatch += 1
            return None
        used = self._used_tokens
        while used:
            oldest = next(iter(used))
            if used[oldest] > now:
                break
            del used[oldest]
        if mac in used:
            stats.reused_tokens += 1
            return None
        if len(used) >= _MAX_USED_TOKENS:
            stats.refused_token_memory += 1
            return None
        return body[9:-CID_LEN], mac

    # -- new connections ------------------------------------------------------------

    def handle_initial(
        self, header: _binding.Header, data: memoryview, address: SockAddr
    ) -> None:
        """Called by the socket for an Initial to an unknown connection id, or
        a datagram of at least 1200 bytes naming a version we do not speak."""
        if self._closed:
            return
        stats = self.statistics
        send = self._socket.send_segments
        if not _binding.version_is_supported(header.version):
            # The socket passes these on only in datagrams of 1200 bytes or
            # more (RFC 9000 5.2.2): VN never answers little with much.
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
        mac: bytes | None = None
        host = address_key(str(address[0]))
        config = self._config
        if config.retry:
            if not header.token:
                if (
                    self._handshaking < config.retry_threshold
                    and self._per_address[host] < config.retry_threshold_per_address
                ):
                    # Quiet: accept the Initial as it is. quiche's
                    # anti-amplification limit (3x) bounds what a spoofed
                    # source gets back until the handshake validates it.
                    stats.unvalidated_handshakes += 1
                    self._start(header, data, address, host, scid, None, None)
                    return
                token = self._mint_token(header.dcid, scid, address)
                packet = _binding.retry(
                    header.scid, header.dcid, scid, token, header.version
                )
                send(memoryview(packet), len(packet), address)
                stats.retries_sent += 1
                return
            checked = self._check_token(header.token, header.dcid, address)
            if checked is None:
                return
            odcid, mac = checked
            scid = header.dcid
        self._start(header, data, address, host, scid, odcid, mac)

    def _start(
        self,
        header: _binding.Header,
        data: memoryview,
        address: SockAddr,
        host: str,
        scid: bytes,
        odcid: bytes | None,
        mac: bytes | None,
    ) -> None:
        """A connection for a new client, unless a limit refuses it."""
        stats = self.statistics
        if self._per_address[host] >= self._config.max_handshakes_per_address:
            stats.refused_address_limit += 1
            return
        refusal = self._admission.admit(host, _now_ms() / 1000)
        if refusal is not None:
            _count_refusal(stats, refusal)
            return
        if mac is not None:
            self._used_tokens[mac] = _now_ms() + _TOKEN_LIFETIME_MS
        try:
            q = _binding.Connection.accept(
                self._binding_config, scid, odcid, self._socket.local_address, address
            )
        except (QuicheError, ValueError):
            self._admission.release(host)
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
        self._socket.route(scid, conn)
        if odcid is None:
            # Until the client switches to our id it keeps using its own.
            self._socket.route(header.dcid, conn)
        self._handshaking += 1
        self._per_address[host] += 1
        stats.handshakes_started += 1
        stats.connections = self._admission.connections
        stats.handshaking = self._handshaking
        # Callbacks, not a task per handshake, keep the handshaking and
        # connection counts honest however the connection ends: the same
        # two for every connection (a partial with the host each cost 250
        # bytes a connection); the host is the remote address's again.
        conn.call_when_verified(self._verified_callback)
        conn.call_when_finished(self._finished_callback)
        conn.start(self._config.handshake_timeout)
        conn.datagram_received(data, address)

    def _verified(self, conn: QUICConnection) -> None:
        self._handshake_over(conn)
        self._connection_ready(conn)

    def _handshake_over(self, conn: QUICConnection) -> None:
        host = _host(conn)
        self._handshaking -= 1
        self.statistics.handshaking = self._handshaking
        self._per_address[host] -= 1
        if not self._per_address[host]:
            del self._per_address[host]
        if not conn.verified:
            self.statistics.handshakes_failed += 1

    def _connection_over(self, conn: QUICConnection) -> None:
        if not conn.verified:  # it ended handshaking
            self._handshake_over(conn)
        self._admission.release(_host(conn))
        self.statistics.connections = self._admission.connections

    def _connection_ready(self, conn: QUICConnection) -> None:
        if self._closed:
            conn.close(0, b"server closed")
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
        the connection is closed when its handler returns (code 0).

        A handler that raises :exc:`trio.BrokenResourceError` (its
        connection or one of its streams failed, the peer's doing) ends
        quietly. Any other exception is a bug of the handler's and ends
        only its own connection: it is logged (``polykey.quic``, WARNING,
        with the peer) and counted in ``statistics.handler_errors``, the
        connection is closed with :data:`CLOSE_HANDLER_FAILED`, and the
        server carries on. Cancelled, it closes every connection it serves.
        """

        async def run(conn: QUICConnection) -> None:
            try:
                await handler(conn)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    conn.close(0, b"server closed")
                    raise  # cancelled, or KeyboardInterrupt
                if not isinstance(exc, trio.BrokenResourceError):
                    self._connection_handler_failed(conn)
                    return
            conn.close()

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn = await self.accept()
                except trio.ClosedResourceError:
                    return
                nursery.start_soon(run, conn)

    async def serve_streams(
        self,
        handler: Callable[[QUICStream], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``handler(stream)`` for every stream the peers open on the
        connections this server accepts, each in its own task; the stream
        is closed when its handler returns (reset if it raised).

        Unlike :meth:`serve`, no task waits per connection: a connection
        hands each new stream over as its packets arrive (a task waiting in
        ``accept_stream`` costs an idle connection 2.4 KB of Python objects,
        more with a nursery of its own, and a node holds thousands of idle
        connections: docs/quic.md has the figures). ``accept_stream`` on a
        connection served here raises :exc:`trio.BusyResourceError`. A
        connection stays open until its peer closes it or it times out, or
        until this returns.

        A handler that raises :exc:`trio.BrokenResourceError` (its stream or
        its connection failed, the peer's doing) ends quietly. Any other
        exception is a bug of the handler's and ends only its own stream:
        it is logged (``polykey.quic``, WARNING, with the peer) and counted
        in ``statistics.handler_errors``, the stream is reset with its
        ``cancel_code``, and the server and the stream's connection carry
        on.

        Cancelled, or once :meth:`aclose` is called, it closes every
        connection it serves (code 0), which fails their streams, and
        returns once every handler has.
        """
        served: set[QUICConnection] = set()
        # One bound method for every connection's finished callback.
        forget = served.discard

        async def run(stream: QUICStream) -> None:
            try:
                await handler(stream)
            except BaseException as exc:
                # Not ``async with stream``: a handler that failed must not
                # end a half-written reply with a FIN, as if it were whole.
                stream.close(forceful=True)
                if not isinstance(exc, Exception):
                    raise  # cancelled, or KeyboardInterrupt
                if not isinstance(exc, trio.BrokenResourceError):
                    self._handler_failed(stream)
                return
            # Closed without a schedule point: the task ends here, so a yield
            # would let nothing run that could not run after it (one round
            # per stream less in a process that serves and then idles).
            stream.close()

        async with trio.open_nursery() as nursery:

            def hand_over(stream: QUICStream) -> None:
                nursery.start_soon(run, stream)

            task_status.started()
            try:
                while True:
                    try:
                        conn = await self.accept()
                    except trio.ClosedResourceError:
                        return
                    if conn.closed:
                        continue  # it ended in accept's checkpoint
                    served.add(conn)
                    conn.call_when_finished(forget)
                    conn.deliver_streams_to(hand_over)
            finally:
                # Each handler's stream fails with its connection: then the
                # nursery waits for nothing that could wait forever.
                for conn in list(served):
                    conn.close()

    def _connection_handler_failed(self, conn: QUICConnection) -> None:
        self.statistics.handler_errors += 1
        _log.warning(
            "a connection handler failed unexpectedly (peer %s); "
            "the connection was closed",
            _peer(conn),
            exc_info=True,
        )
        conn.close(CLOSE_HANDLER_FAILED, b"handler failed")

    def _handler_failed(self, stream: QUICStream) -> None:
        self.statistics.handler_errors += 1
        _log.warning(
            "a stream handler failed unexpectedly (peer %s, stream %d); "
            "the stream was reset",
            _peer(stream.connection),
            stream.stream_id,
            exc_info=True,
        )

    async def aclose(self) -> None:
        """Stop accepting; close connections that were never accepted."""
        if not self._closed:
            self._closed = True
            self._socket.attach_server(None)
            while self._ready:
                self._ready.popleft().close(0, b"server closed")
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()
