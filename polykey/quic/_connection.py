"""A QUIC connection: one quiche connection and its streams.

Theory of operation
-------------------
Input arrives synchronously: the socket's reader calls :meth:`datagram_received`
for each packet (quiche decrypts and processes it at once) and, when the
socket is drained, :meth:`after_input` once. That is where everything happens, in
this order, and the invariant every path keeps (aioquic's ``transmit()``):

1. right after the handshake, verify the peer's certificate chain; until it
   passes no stream is delivered, and on failure the connection closes with
   CRYPTO_ERROR 0x100 + TLS alert;
2. wake the streams quiche reports readable, queue new peer streams for
   :meth:`accept_stream`, wake parked writers and stream openers;
3. flush: hand quiche's pending packets to the socket (GSO batches);
4. re-arm the one timer: min(quiche's timeout, keep-alive, handshake
   deadline), or notice that quiche closed the connection.

Step 3 and 4 after socket input are deferred to the socket's idle-point
flush, which runs them once every task is blocked (see
QUICSocket.flush_later), so that ACKs
ride on the replies of the tasks the input woke; a read that frees credit defers its flush the
same way. Writes and closes call :meth:`flush` themselves, synchronously.
A connection has no task of its own: the socket's timer task calls
:meth:`timer_due` when the connection's one deadline comes (quiche's
``on_timeout``, then the same steps at once), and its writer task
:meth:`retry_send` once the kernel's send buffer has room again for a batch
it refused. So nothing per packet needs a task switch, and an idle
connection costs no task at all (a task per connection cost about 2 KB).

quiche reads the real monotonic clock; the timer is a trio deadline. Under
trio's MockClock the two disagree, see docs/quic.md.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio
from trio.lowlevel import Abort

from ..keys import NodeId
from . import _binding
from ._address import SockAddr
from ._carrier import CarrierRoutes, DatagramForward, ForwardCallback
from ._config import PeerVerifier, QUICConfig
from ._errors import (
    CloseKind,
    CloseReason,
    PeerVerificationError,
    QUICConnectionError,
    QuicheError,
    TLSAlert,
    TransportErrorCode,
)
from ._state import Deadlines, StreamIds, close_reason
from ._stream import QUICStream

if TYPE_CHECKING:
    from ._socket import QUICSocket, Timer

__all__ = ["ConnectionStatistics", "QUICConnection"]

#: Small stream writes waiting for company are flushed at once when they
#: add up to about a packet (quiche sends at most ~1,350 bytes a packet).
_COALESCE_BYTES = 1200

_log = logging.getLogger("polykey.quic")


@attrs.frozen
class ConnectionStatistics:
    """quiche's counters, the active path's, and the connection's own."""

    quiche: _binding.Stats
    path: _binding.PathStats | None
    datagrams_in: int
    timer_fires: int
    flushes: int
    send_blocked: int
    streams_open: int
    #: Streams closed here that quiche may still hold (their last frames not
    #: yet acknowledged, or stopped by the peer): swept after each input.
    streams_closing: int


class QUICConnection(trio.abc.AsyncResource):
    """One QUIC connection, made by :class:`~polykey.quic.QUICServer` or
    :func:`~polykey.quic.connect`.

    ``peer_identity`` is what the peer verifier returned (a NodeId for polykey
    nodes) and ``peer_certificates`` the chain it checked. ``close_reason``
    says how the connection ended once it has.
    """

    # Slots, not a __dict__: about 1 KiB less per connection.
    __slots__ = (
        "__weakref__",
        "_acceptors",
        "_carrier_routes",
        "_closed_event",
        "_closed_held",
        "_config",
        "_credit_lot",
        "_datagrams_in",
        "_deadlines",
        "_finished",
        "_first_flight",
        "_flushes",
        "_handshake_done",
        "_incoming",
        "_on_datagram",
        "_on_finished",
        "_on_stream",
        "_on_verified",
        "_pending",
        "_send_blocked",
        "_send_waiters",
        "_socket",
        "_stream_ids",
        "_streams",
        "_timer",
        "_timer_fires",
        "_unflushed",
        "_verified",
        "_verifier",
        "_verify_error",
        "close_reason",
        "is_server",
        "local_address",
        "peer_certificates",
        "peer_identity",
        "quiche",
        "remote_address",
        "schedule_point",
        "scratch",
    )

    def __init__(
        self,
        socket: QUICSocket,
        q: _binding.Connection,
        *,
        is_server: bool,
        config: QUICConfig,
        verifier: PeerVerifier | None,
        remote_address: SockAddr,
    ) -> None:
        self._socket = socket
        # For streams, so that each read makes one call, not two: the
        # socket's scratch buffer of at least ``size`` bytes, valid until
        # the next await; one bound method shared by the socket's
        # connections. (Not flush_later: a partial bound to self would
        # make every connection a reference cycle, left to the cyclic GC.)
        self.scratch: Callable[[int], bytearray] = socket.bound_scratch
        #: The schedule point that ends an operation which did not wait
        #: (QUICSocket.schedule_point), for this connection's streams too.
        self.schedule_point: Callable[[], Awaitable[None]] = socket.bound_schedule_point
        #: The quiche connection. Streams call its ``stream_*`` functions for
        #: their own stream id; everything else is this object's.
        self.quiche = q
        self.is_server = is_server
        self._config = config
        self._verifier = verifier
        self.remote_address = remote_address
        self.local_address = socket.local_address
        self.peer_identity: NodeId | None = None
        self.peer_certificates: tuple[bytes, ...] = ()
        self.close_reason: CloseReason | None = None
        self._streams: dict[int, QUICStream] = {}
        # What an idle connection does not use is made when first needed
        # (None until then): a server holds thousands of idle connections,
        # and an empty set, deque or ParkingLot costs 200-700 bytes.
        # Streams we closed that quiche still holds (see _sweep_closed).
        self._closed_held: set[int] | None = None
        self._incoming: collections.deque[QUICStream] | None = None
        # Tasks waiting in accept_stream: a list, not a ParkingLot (its
        # OrderedDict and park() frame cost about 500 bytes), since a
        # node's every connection has one waiting all its life.
        self._acceptors: list[trio.lowlevel.Task] | None = None
        self._credit_lot: trio.lowlevel.ParkingLot | None = None
        self._send_waiters: set[QUICStream] | None = None
        self._handshake_done: trio.Event | None = None
        self._closed_event: trio.Event | None = None
        self._verified = False
        self._finished = False
        self._verify_error: PeerVerificationError | None = None
        self._stream_ids = StreamIds(is_server=is_server)
        self._deadlines = Deadlines()
        # Our entry in the socket's timer queue, for _deadlines.armed.
        self._timer: Timer | None = None
        self._pending: tuple[bytes, int, SockAddr] | None = None
        # What we sent before the peer's first packet, kept only for a dial
        # that re-sends it through a hole punch (see resend_first_flight).
        self._first_flight: list[tuple[bytes, int, SockAddr]] | None = None
        self._on_datagram: Callable[[bytes], None] | None = None
        # Where new peer streams go instead of accept_stream (serve_streams).
        self._on_stream: Callable[[QUICStream], None] | None = None
        # Routes of our datagrams that never reach Python (see _carrier).
        self._carrier_routes: CarrierRoutes | None = None
        # Made by the first callback; the verified ones are dropped once run.
        self._on_verified: list[Callable[[QUICConnection], None]] | None = None
        self._on_finished: list[Callable[[QUICConnection], None]] | None = None
        # Driver counters.
        self._datagrams_in = 0
        self._timer_fires = 0
        self._flushes = 0
        self._send_blocked = 0
        # Bytes of small stream writes not flushed yet (flush_small).
        self._unflushed = 0

    def __repr__(self) -> str:
        side = "server" if self.is_server else "client"
        return f"<QUICConnection {side} {self.remote_address}>"

    # -- start ------------------------------------------------------------------

    def start(self, handshake_timeout: float | None) -> None:
        """Register with the socket, send what is due (which arms the timer).
        Called once, by the server or client that made the connection,
        after routing its connection id."""
        self._socket.add_connection(self)
        if handshake_timeout is not None:
            self._deadlines.handshake = trio.current_time() + handshake_timeout
        self.after_input()

    # -- public API ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._finished

    @property
    def streams_open(self) -> int:
        """Streams opened or accepted here and not yet ended (in use)."""
        return len(self._streams)

    async def wait_closed(self) -> CloseReason:
        """Wait until the connection has ended; returns how."""
        if not self._finished:
            if self._closed_event is None:
                self._closed_event = trio.Event()
            await self._closed_event.wait()
        else:
            await trio.lowlevel.checkpoint()
        assert self.close_reason is not None
        return self.close_reason

    async def open_stream(self, *, unidirectional: bool = False) -> QUICStream:
        """Open a new stream, waiting while the peer's stream limit is
        reached. The peer learns of it with its first data or FIN."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self.raise_if_dead()
            if not self._verified:
                await self.wait_handshake()
                continue
            if self._streams_left(unidirectional):
                break
            if self._credit_lot is None:
                self._credit_lot = trio.lowlevel.ParkingLot()
            await self._credit_lot.park()
        stream = self._open_local(unidirectional)
        await self.schedule_point()
        return stream

    def open_stream_nowait(self, *, unidirectional: bool = False) -> QUICStream:
        """:meth:`open_stream` when it need not wait, without its checkpoint;
        raises :exc:`trio.WouldBlock` before the handshake is done and while
        the peer's stream limit is reached.

        For a caller that waits right after (an RPC client's unary call
        opens its stream with it, writes its request, and waits for the
        answer: one scheduling round less per call).
        """
        self.raise_if_dead()
        if not self._verified or not self._streams_left(unidirectional):
            raise trio.WouldBlock
        return self._open_local(unidirectional)

    def _streams_left(self, unidirectional: bool) -> bool:
        q = self.quiche
        left = (
            q.peer_streams_left_uni() if unidirectional else q.peer_streams_left_bidi()
        )
        return left > 0

    def _open_local(self, unidirectional: bool) -> QUICStream:
        sid = self._stream_ids.open_local(unidirectional=unidirectional)
        # An empty write creates the stream in quiche, so it counts against
        # the peer's limit at once, as our bookkeeping assumes.
        self.quiche.stream_send(sid, b"", False)
        stream = QUICStream(self, sid, can_read=not unidirectional, can_write=True)
        self._streams[sid] = stream
        return stream

    async def accept_stream(self) -> QUICStream:
        """Wait for the peer's next new stream."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while not self._incoming:
            self.raise_if_dead()
            if self._on_stream is not None:
                raise trio.BusyResourceError(
                    "this connection's streams go to a handler (serve_streams)"
                )
            # Parked here, not in a helper coroutine: one frame less to keep.
            task = trio.lowlevel.current_task()
            if self._acceptors is None:
                self._acceptors = []
            self._acceptors.append(task)

            def abort(_: object, task: trio.lowlevel.Task = task) -> Abort:
                # Cancelled while still in the list: only a wake-up (which
                # reschedules every task in it) replaces the list.
                if self._acceptors is not None and task in self._acceptors:
                    self._acceptors.remove(task)
                return Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            waited = True
        stream = self._incoming.popleft()
        if not waited:
            # Waiting was the checkpoint (as in trio's own accept): a server
            # answering a new stream is one scheduling round sooner.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    def _wake_acceptors(self) -> None:
        tasks, self._acceptors = self._acceptors, None
        if tasks:
            for task in tasks:
                trio.lowlevel.reschedule(task)
            self._socket.note_runnable()

    def close(self, code: int = 0, reason: bytes = b"") -> None:
        """Close now with an application error ``code`` and ``reason``
        (synchronous: for code that cannot await); every stream fails."""
        self._close_now(is_app=True, code=code, reason=reason)

    async def aclose(self, code: int = 0, reason: bytes = b"") -> None:
        """Close with an application error ``code`` and ``reason``. Closing
        happens at once, even when cancelled; every stream fails."""
        self._close_now(is_app=True, code=code, reason=reason)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ConnectionStatistics:
        path = next(iter(self.quiche.path_stats()), None)
        return ConnectionStatistics(
            quiche=self.quiche.stats(),
            path=path,
            datagrams_in=self._datagrams_in,
            timer_fires=self._timer_fires,
            flushes=self._flushes,
            send_blocked=self._send_blocked,
            streams_open=len(self._streams),
            streams_closing=len(self._closed_held or ()),
        )

    # -- datagrams (RFC 9221) -----------------------------------------------------------

    def on_datagram(self, handler: Callable[[bytes], None] | None) -> None:
        """Call ``handler(payload)`` for each DATAGRAM frame the peer sends
        (synchronously, from the socket's reader: it must not block).
        Needs ``QUICConfig(datagrams=True)`` on both sides."""
        self._on_datagram = handler
        if handler is not None and self._verified:
            self._deliver_datagrams()

    def send_datagram(self, payload: bytes) -> bool:
        """Queue an unreliable DATAGRAM frame; sent with the deferred flush,
        with whatever else is due. False when quiche's queue is full
        or the payload is larger than :meth:`datagram_max_size`."""
        if self._finished or not self._verified:
            return False
        try:
            queued = self.quiche.dgram_send(payload)
        except QuicheError:
            return False
        if queued:
            self._socket.flush_later(self)
        return queued

    def forward_datagrams(
        self,
        prefix: bytes,
        target: QUICConnection,
        target_prefix: bytes,
        *,
        budget: int,
        on_forwarded: ForwardCallback | None = None,
    ) -> DatagramForward:
        """Forward the peer's DATAGRAM frames that start with ``prefix`` to
        ``target``, with ``target_prefix`` in its place, without a trip
        through Python per frame (a relay's circuit), at most ``budget``
        payload bytes; a frame past it, or an empty one, goes to the
        :meth:`on_datagram` handler. ``on_forwarded(datagrams, bytes,
        dropped)`` hears what was forwarded after each batch. Every prefix
        routed on a connection has one length."""
        if self._carrier_routes is None:
            self._carrier_routes = CarrierRoutes(len(prefix))
        return self._carrier_routes.forward(
            prefix, target, target_prefix, budget, on_forwarded
        )

    def carry_to(self, prefix: bytes, inner: QUICConnection, dcid: bytes) -> None:
        """Deliver our datagrams ``prefix || short-header packet for dcid``
        to ``inner`` directly (a virtual path's fast lane)."""
        if self._carrier_routes is None:
            self._carrier_routes = CarrierRoutes(len(prefix))
        self._carrier_routes.deliver(prefix, inner, dcid)

    def stop_carrying(self, prefix: bytes) -> None:
        if self._carrier_routes is not None:
            self._carrier_routes.undeliver(prefix)

    def datagram_max_size(self) -> int | None:
        """The largest DATAGRAM payload that fits now; None when the peer
        does not take datagrams."""
        if self._finished:
            return None
        return self.quiche.dgram_max_writable_len()

    def _deliver_datagrams(self) -> None:
        handler = self._on_datagram
        routes = self._carrier_routes
        buf = self._socket.scratch(65536)
        q = self.quiche
        while True:
            try:
                if routes is None:
                    n = q.dgram_recv(buf)
                else:
                    n = q.dgram_route(routes.table, buf)
            except QuicheError:
                # Done (the queue is empty) is None, and our buffer is larger
                # than any datagram: an error here is a bug of ours.
                self.report_bug("reading a DATAGRAM frame")
                n = None
            finally:
                # Before the handler sees the frame no route took: a
                # relay's budget check needs what the routes carried.
                if routes is not None:
                    try:
                        routes.settle()
                    except Exception:
                        self.report_bug("a datagram route's callback")
            if n is None:
                return
            if handler is not None:
                try:
                    handler(bytes(buf[:n]))
                except Exception:
                    # The application's code, run from the socket's reader:
                    # its bug must not end the socket (and every connection).
                    self.report_bug("the DATAGRAM handler")

    # -- hole punching ---------------------------------------------------------------

    def keep_first_flight(self) -> None:
        """Remember what is sent until the peer's first packet arrives, for
        :meth:`resend_first_flight`. Call before the connection starts."""
        self._first_flight = []

    def resend_first_flight(self) -> bool:
        """Send our first flight (the client's Initial) again, unchanged.

        Through a hole punch the first Initial is often dropped by the far
        NAT, which opens only once the peer has sent toward us; quiche would
        retransmit it only after its probe timeout (about a second). The
        identical datagram is harmless: a server that got the first copy
        drops the rest as duplicates. Returns False, sending nothing, once
        the peer has answered (the path is open) or the connection ended.
        """
        flight = self._first_flight
        if flight is None or self._datagrams_in or self._finished:
            self._first_flight = None
            return False
        for data, segment, to in flight:
            self._socket.send_segments(memoryview(data), segment, to)
        return True

    @property
    def answered(self) -> bool:
        """Whether any packet from the peer has arrived."""
        return self._datagrams_in > 0

    # -- internal interface: socket, server, client and streams -------------------
    # (see "Internal interfaces" in docs/quic.md; the input and output steps
    # below belong to it too)

    @property
    def verified(self) -> bool:
        """Whether the handshake is done and the peer passed verification."""
        return self._verified

    async def wait_handshake(self) -> bool:
        """Wait until the handshake is over: True if the peer was verified,
        False if the connection ended first (see :meth:`closed_error`)."""
        if self._verified or self._finished:
            await trio.lowlevel.checkpoint()
        else:
            if self._handshake_done is None:
                self._handshake_done = trio.Event()
            await self._handshake_done.wait()
        return self._verified

    def call_when_verified(self, callback: Callable[[QUICConnection], None]) -> None:
        """Call ``callback(self)`` right after the peer is verified, before
        any stream is delivered (never, if the handshake fails)."""
        if self._verified or self._finished:
            return  # too late, as before: the list was run already
        if self._on_verified is None:
            self._on_verified = []
        self._on_verified.append(callback)

    def call_when_finished(self, callback: Callable[[QUICConnection], None]) -> None:
        """Call ``callback(self)`` once the connection has ended, however it
        ended (a failed handshake included)."""
        if self._finished:
            return  # too late, as before: the list was run already
        if self._on_finished is None:
            self._on_finished = []
        self._on_finished.append(callback)

    def deliver_streams_to(self, callback: Callable[[QUICStream], None]) -> None:
        """Hand each new stream of the peer's to ``callback(stream)`` instead
        of to :meth:`accept_stream` (which then raises BusyResourceError):
        those already waiting at once, the later ones from the socket's
        reader as they arrive (``callback`` must not block). For
        :meth:`QUICServer.serve_streams`: no task waits per connection."""
        if self._finished:
            return
        self._on_stream = callback
        incoming, self._incoming = self._incoming, None
        for stream in incoming or ():
            self._hand_over(stream)
        self._wake_acceptors()

    def raise_if_dead(self) -> None:
        """Raise :meth:`closed_error` if the connection has ended."""
        if self._finished:
            raise self.closed_error()

    def closed_error(self) -> QUICConnectionError:
        """The error operations on this (ended) connection raise."""

        reason = self.close_reason or CloseReason(CloseKind.LOCAL)
        if self._verify_error is not None:
            exc = QUICConnectionError(
                reason, f"peer verification failed: {self._verify_error}"
            )
            exc.__cause__ = self._verify_error
            return exc
        return QUICConnectionError(reason)

    # -- input ----------------------------------------------------------------------

    def datagram_received(self, data: memoryview, address: SockAddr) -> None:
        """One packet from the socket's reader (``data`` is spent after)."""
        if self._finished:
            return
        self._datagrams_in += 1
        try:
            self.quiche.recv(data, address)
        except QuicheError:
            # A bad or late packet: quiche drops it, or closes the connection
            # if it is fatal, which after_input notices.
            self._socket.statistics.dropped_by_quiche += 1
        self._socket.mark_dirty(self)

    def datagrams_carried(self, n: int) -> None:
        """A carrier connection's C route handed quiche ``n`` of our packets
        (see _carrier): count them and act on them with the socket's input."""
        self._datagrams_in += n
        self._socket.mark_dirty(self)

    def segments_received(
        self, data: memoryview, segment: int, dcid: bytes, address: SockAddr
    ) -> int:
        """A run of GRO segments addressed to us; returns bytes consumed."""
        if self._finished:
            return 0
        used = self.quiche.recv_segments(data, segment, dcid, address)
        if used:
            self._datagrams_in += -(-used // segment)
            self._socket.mark_dirty(self)
        return used

    def after_input(self, *, defer_flush: bool = False) -> None:
        """Act on the input received since the last call (steps 1-4 above);
        ``defer_flush``: leave steps 3 and 4 to the socket's idle flush once
        the handshake is done."""
        if self._finished:
            return
        q = self.quiche
        was_verified = self._verified
        if not was_verified and q.is_established():
            self._verify()
        if self._verified and not self._finished:
            if self._on_datagram is not None or self._carrier_routes is not None:
                self._deliver_datagrams()
            self._deliver_streams()
            if self._closed_held:
                self._sweep_closed()
            if self._send_waiters:
                for stream in list(self._send_waiters):
                    stream.wake_sender()
            if self._credit_lot and (
                q.peer_streams_left_bidi() > 0 or q.peer_streams_left_uni() > 0
            ):
                self._credit_lot.unpark_all()
        if defer_flush and was_verified:
            self._socket.flush_later(self)
        else:
            # During the handshake, flush at once: the last flight must be
            # out before connect() returns (a caller may close right away,
            # and quiche sends only the close then).
            self.flush_after_input()

    def flush_after_input(self) -> None:
        """Steps 3 and 4: flush, then re-arm or notice quiche closed."""
        if self._finished:
            return
        self.flush()
        if self.quiche.is_closed():
            self._finish(self._derive_reason())
        else:
            self._rearm()

    def _verify(self) -> None:
        chain = self.quiche.take_peer_cert_chain()
        self.peer_certificates = tuple(chain)
        try:
            if not chain:
                raise PeerVerificationError(
                    "the peer sent no certificate", TLSAlert.CERTIFICATE_REQUIRED
                )
            if self._verifier is not None:
                self.peer_identity = self._verifier(chain)
        except Exception as exc:
            if not isinstance(exc, PeerVerificationError):
                # A verifier that raises anything else (a bug in it) still
                # refuses the peer; it must not take the socket down.
                self.report_bug("the peer verifier")
                # Its text stays in the log: the close reason goes to the peer.
                bug, exc = exc, PeerVerificationError("the verifier failed")
                exc.__cause__ = bug
            self._verify_error = exc
            self._close_now(
                is_app=False,
                code=TransportErrorCode.CRYPTO_ERROR + int(exc.alert),
                reason=str(exc).encode()[:256],
                kind=CloseKind.VERIFICATION,
            )
            return
        self._verified = True
        self._deadlines.handshake = math.inf
        if self._handshake_done is not None:
            # Its waiters are woken; nothing waits on it again.
            self._handshake_done.set()
            self._handshake_done = None
        callbacks, self._on_verified = self._on_verified, None
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:
                self.report_bug(f"a verified callback ({_name(callback)})")

    def _deliver_streams(self) -> None:
        q = self.quiche
        streams = self._streams
        ids = self._stream_ids
        woken = 0  # tasks woken, and the tasks handed-over streams start
        while (sid := q.readable_next()) is not None:
            stream = streams.get(sid)
            if stream is not None:
                if stream.wake_receiver():
                    woken += 1
                continue
            if not ids.accept_peer(sid):
                self.discard_input(sid)  # a stream closed already, ours or theirs
                continue
            stream = QUICStream(self, sid, can_read=True, can_write=not sid & 2)
            streams[sid] = stream
            if self._on_stream is not None:
                self._hand_over(stream)
                woken += 1
                continue
            if self._incoming is None:
                self._incoming = collections.deque()
            self._incoming.append(stream)
            self._wake_acceptors()
        if woken:
            self._socket.note_runnable(woken)

    def _hand_over(self, stream: QUICStream) -> None:
        assert self._on_stream is not None
        try:
            self._on_stream(stream)
        except Exception:
            # Run from the socket's reader: a bug must not end it.
            self.report_bug(f"the stream callback ({_name(self._on_stream)})")
            stream.close(forceful=True)

    def _sweep_closed(self) -> None:
        # quiche keeps a stream the peer stopped (STOP_SENDING) until the
        # application touches it again, to hand it the StreamStopped error;
        # we closed it already and never would, so quiche would keep it for
        # good, and a stream of the peer's that quiche keeps is one of its
        # stream credits gone (an RPC client that stops reading after an
        # error response used them all up in about 1,000 calls). Asking for
        # its capacity is that touch: quiche then collects it.
        q = self.quiche
        held = self._closed_held
        assert held is not None
        # Collected now if complete; a stream still held is seen again next time.
        done = [sid for sid in held if q.stream_collect(sid)]
        if done:
            held.difference_update(done)

    def discard_input(self, sid: int) -> None:
        """Read and drop what quiche holds of stream ``sid``'s input (its
        FIN too, which lets quiche collect a finished stream)."""
        buf = self._socket.scratch(65536)
        recv = self.quiche.stream_recv
        try:
            # Not past the FIN: quiche may have collected the stream with
            # it, and a read then fails (an exception made and caught per
            # call, when a server call leaves the caller's FIN to us).
            while (got := recv(sid, buf)) is not None and not got[1]:
                pass
        except QuicheError:
            pass

    # -- output -----------------------------------------------------------------------

    def flush_small(self, nbytes: int) -> None:
        """A stream took a small write of ``nbytes`` that may wait for
        company: flush now once a packet's worth waits, else with the
        socket's deferred flush."""
        self._unflushed += nbytes
        if self._unflushed >= _COALESCE_BYTES:
            self.flush()
        else:
            self._socket.flush_later(self)

    def flush_soon(self) -> None:
        """A stream took a small write while other tasks our input woke run
        in its batch: flush before the scheduler's next poll, with what
        they write (QUICSocket.flush_soon)."""
        self._socket.flush_soon(self)

    def small_write_waits(self) -> bool:
        """Whether a small write made with nothing runnable waits for the
        rest of its scheduler batch (QUICSocket.small_write_waits)."""
        return self._socket.small_write_waits()

    def flush(self) -> None:
        """Send what quiche has to send now (synchronous)."""
        self._unflushed = 0
        if self._pending is not None or self._finished:
            return
        socket = self._socket
        buf = socket.send_buffer
        view = socket.send_view
        segments = socket.max_segments
        q = self.quiche
        send = socket.send_segments
        self._flushes += 1
        sent = False
        while True:
            try:
                out = q.send_batch(buf, segments)
            except QuicheError:
                break
            if out is None:
                break
            sent = True
            total, segment, to = out
            if self._first_flight is not None and not self._datagrams_in:
                self._first_flight.append((bytes(view[:total]), segment, to))
            if not send(view[:total], segment, to):
                self._pending = (bytes(view[:total]), segment, to)
                self._send_blocked += 1
                self._socket.send_refused(self)
                break
        if sent:
            # Sending arms quiche's loss-detection timer.
            self._rearm()
            # What a deferred flush was waiting to send (ACKs) just went.
            socket.flush_sent(self)

    def _rearm(self) -> None:
        deadlines = self._deadlines
        keep_alive = self._config.keep_alive_interval if self._verified else None
        if deadlines.rearm(self._socket.now(), self.quiche.timeout(), keep_alive):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._socket.set_timer(self, deadlines.armed)

    # -- timer and blocked sends, from the socket ------------------------------------

    def timer_due(self) -> None:
        """The socket's timer reached the deadline this connection armed
        last (see _rearm)."""
        self._timer = None
        if self._finished:
            return
        self._on_timer()
        self.after_input()

    def retry_send(self) -> bool:
        """The socket may take data again: send the batch it refused, then
        what else is due. False: a batch is still refused."""
        pending = self._pending
        if pending is None or self._finished:
            return pending is None
        data, segment, to = pending
        if not self._socket.send_segments(memoryview(data), segment, to):
            return False
        self._pending = None
        self.after_input()
        # What after_input flushed may have been refused in turn.
        return self._pending is None

    def socket_lost(self) -> None:
        """The socket's tasks are gone (its nursery was cancelled without
        closing it): nothing drives this connection any more."""
        self._close_now(
            is_app=True, code=0, reason=b"socket closed", kind=CloseKind.SOCKET_CLOSED
        )

    def _on_timer(self) -> None:
        self._timer_fires += 1
        due = self._deadlines.due(self._socket.now())
        if due.handshake:
            self._close_now(
                is_app=False,
                code=0,
                reason=b"handshake timeout",
                kind=CloseKind.HANDSHAKE_TIMEOUT,
            )
            return
        if due.quiche:
            self.quiche.on_timeout()
        if due.keep_alive:
            self.quiche.send_ack_eliciting()  # the next is scheduled by _rearm

    # -- closing ----------------------------------------------------------------------

    def _close_now(
        self,
        *,
        is_app: bool,
        code: int,
        reason: bytes,
        kind: CloseKind = CloseKind.LOCAL,
    ) -> None:
        if self._finished:
            return
        try:
            self.quiche.close(is_app, code, reason)
        except (QuicheError, ValueError):
            pass
        self.flush()
        self._finish(CloseReason(kind, is_app=is_app, code=code, reason=reason))

    def _derive_reason(self) -> CloseReason:
        q = self.quiche
        return close_reason(
            verified=self._verified,
            timed_out=q.is_timed_out(),
            peer=q.peer_error(),
            local=q.local_error(),
        )

    def _finish(self, reason: CloseReason) -> None:
        if self._finished:
            return
        self._finished = True
        if self.close_reason is None:
            self.close_reason = reason
        for stream in list(self._streams.values()):
            stream.connection_lost()
        self._streams.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed_held = None
        self._send_waiters = None
        self._on_stream = None
        self._wake_acceptors()
        if self._credit_lot is not None:
            self._credit_lot.unpark_all()
        if self._handshake_done is not None:
            self._handshake_done.set()
        if self._closed_event is not None:
            self._closed_event.set()
        self._socket.remove_connection(self)
        callbacks, self._on_finished = self._on_finished, None
        self._on_verified = None
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:
                self.report_bug(f"a finished callback ({_name(callback)})")

    def report_bug(self, what: str) -> None:
        """A bug caught in an ``except`` block (ours, or the application's
        callback; a stream's input watcher's too): counted in the socket's
        ``unexpected_errors`` and logged at WARNING with the peer."""
        self._socket.statistics.unexpected_errors += 1
        peer = f"{self.remote_address[0]}:{self.remote_address[1]}"
        if self.peer_identity is not None:
            peer = f"{self.peer_identity} at {peer}"
        _log.warning("%s failed unexpectedly (peer %s)", what, peer, exc_info=True)

    def fail_unexpectedly(self, what: str) -> None:
        """A bug of ours escaped ``what`` (this connection's input or timer):
        logged and counted, and the connection, whose state can no longer
        be trusted, closed with INTERNAL_ERROR; the socket and its other
        connections carry on."""
        self.report_bug(what)
        try:
            self._close_now(
                is_app=False, code=int(TransportErrorCode.INTERNAL_ERROR), reason=b""
            )
        except Exception:
            self.report_bug("closing the connection after that")

    # -- internal interface for streams ------------------------------------------------

    def forget_stream(self, stream: QUICStream) -> None:
        """``stream`` is closed: stop waking it (and sweep it until quiche
        lets it go, see _sweep_closed)."""
        sid = stream.stream_id
        if self._streams.get(sid) is stream:
            del self._streams[sid]
            if not self._finished:
                if self._closed_held is None:
                    self._closed_held = set()
                self._closed_held.add(sid)

    def add_send_waiter(self, stream: QUICStream) -> None:
        """Wake ``stream``'s sender after each batch of input, until
        :meth:`discard_send_waiter`."""
        if self._send_waiters is None:
            self._send_waiters = set()
        self._send_waiters.add(stream)

    def discard_send_waiter(self, stream: QUICStream) -> None:
        if self._send_waiters is not None:
            self._send_waiters.discard(stream)

    def tasks_runnable(self) -> bool:
        """Whether another task is waiting to run (QUICSocket.tasks_runnable)."""
        return self._socket.tasks_runnable()

    def flush_later(self) -> None:
        """Flush with the socket's deferred flush (what a read frees: credit;
        the ACK of a finished stream's FIN)."""
        self._socket.flush_later(self)


def _name(callback: Callable[..., object]) -> str:
    """A callback's name for the log (a partial's function's)."""
    func = getattr(callback, "func", callback)
    return getattr(func, "__qualname__", repr(func))
