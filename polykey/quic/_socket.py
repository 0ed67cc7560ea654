"""One UDP socket, shared by a server and any number of client connections.

Theory of operation
-------------------
:class:`QUICSocket` owns a non-blocking stdlib UDP socket, a nursery, and one
reader task. The reader waits with ``trio.lowlevel.wait_readable`` and then
drains the socket until it would block, without awaiting per datagram. Each
datagram is routed synchronously:

* a short header (the bulk of traffic) is routed by the 16-byte DCID we
  chose, sliced straight out of the packet with no parsing call;
* a long header goes through quiche's header parser: known DCIDs go to their
  connection, Initials and packets of versions we do not speak (in
  datagrams of at least 1200 bytes) to the attached server (which may
  answer with version negotiation or Retry), everything else is dropped and
  counted;
* datagrams that are not QUIC at all (hole-punching noise) are counted and
  dropped; while a :class:`StrayWatch` for their source host is open (a
  punch in progress), their source address is noted first: it is where the
  punching peer's NAT maps it toward us (a peer-reflexive address).

``Connection.recv`` is called inline and the connection is remembered as
"dirty"; once the socket is drained, every dirty connection flushes what
quiche wants to send, re-arms its timer and wakes its streams. So a burst of
datagrams costs one wake-up and one flush per connection, not a task switch
per packet.

Sending is synchronous too: ``send_segments`` writes one GSO batch (one
``sendmsg`` carrying up to 64 packets) where the kernel supports UDP_SEGMENT,
or one ``sendto`` per packet where it does not. When the kernel's buffer is
full the caller keeps the batch and waits for writability in its own task.

Receiving uses UDP GRO where available: the kernel may coalesce packets of
one flow into one buffer and tells the segment size in a control message.

Connections have no tasks: this socket's reader, timer and (while the
kernel refuses sends) writer tasks drive them all, with the deferred
flushes run by the scheduler at its idle point (:meth:`QUICSocket.flush_later`),
so leaving the ``async with`` block closes every connection made through it.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import socket as _stdlib_socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio
import trio.testing

from . import _binding
from ._address import Address, SockAddr, for_family, unmap_ipv4
from ._errors import CloseKind, QuicheError, TransportErrorCode

if TYPE_CHECKING:
    from ._connection import QUICConnection

__all__ = ["CID_LEN", "QUICSocket", "SocketStatistics", "StrayWatch", "VirtualPath"]

_log = logging.getLogger("polykey.quic")

#: Length of every connection id we issue; short headers are routed by it.
CID_LEN: Final = 16

_SOL_UDP: Final = 17
_UDP_SEGMENT: Final = 103
_UDP_GRO: Final = 104
#: Linux accepts up to 64 segments per GSO send (UDP_MAX_SEGMENTS).
MAX_GSO_SEGMENTS: Final = 64
_RECV_BUFFER: Final = 65536
_RECV_SLOTS: Final = 2
_GSO_BYTES: Final = 65000
_SOCKET_BUFFER: Final = 4 * 1024 * 1024
#: The longest a deferred flush waits for the process to have nothing else
#: to run (flush_later): well under quiche's max_ack_delay (25 ms), which the
#: peer's loss detection allows for.
FLUSH_WAIT: Final = 0.002


def _wake_loop() -> None:
    """Nothing: queued to make trio's I/O poll return at once."""


class _IdleFlush(trio.abc.Instrument):
    """Runs the sockets' deferred flushes at trio's idle point, just before
    the scheduler polls for I/O with nothing left to run (see
    :meth:`QUICSocket.flush_later`): one per trio run, for every socket in
    it, so a round with nothing due costs one test.

    The flush happens in the scheduler's own step, not in a task woken to
    do it: no task step, no round of its own, no cancel scope. The
    scheduler computed its poll's timeout before this step, so what a flush
    wakes (a connection that closed) and a timer it arms earlier than that
    timeout (quiche's loss-detection timer, after a send) would wait out
    the poll: then the poll is told not to wait.

    Whether the run queue is empty is asked of trio only when the poll's
    timeout cannot tell and we made no task runnable since the last poll
    (:attr:`runnable`): ``current_statistics()`` builds the I/O backend's
    statistics each time, and most rounds of a call or a round trip follow
    a yield of ours or a task our input woke (docs/quic.md has the
    figures).
    """

    __slots__ = ("_added", "_sockets", "companions", "now", "runnable", "woken")

    def __init__(self) -> None:
        # Sockets with deferred flushes due, in marking order.
        self._sockets: dict[QUICSocket, None] = {}
        #: A task yielded at :meth:`QUICSocket.schedule_point`, or input woke
        #: one (:meth:`QUICSocket.note_runnable`), since the last poll: it
        #: waits in the run queue, so the run is not idle.
        self.runnable = False
        #: Tasks our input woke since the last poll (they run in the next
        #: batch), and whether the batch running now holds two or more, or
        #: a small write already went alone in it (small_write_waits): then
        #: a small write waits for the rest of it (flush_soon).
        self.woken = 0
        self.companions = False
        # A socket was added since before_io_wait began its flushes.
        self._added = False
        #: trio.current_time() without its two wrappers (made in the run):
        #: the run's clock's own, which the run's sockets read too.
        self.now = trio.lowlevel.current_clock().current_time

    def add(self, sock: QUICSocket) -> None:
        self._sockets[sock] = None
        self._added = True

    def discard(self, sock: QUICSocket) -> None:
        self._sockets.pop(sock, None)

    def before_io_wait(self, timeout: float) -> None:
        runnable, self.runnable = self.runnable, False
        self.companions = self.woken > 1
        self.woken = 0
        sockets = self._sockets
        if not sockets:
            return
        stats = trio.lowlevel.current_statistics
        # A poll that may wait means nothing is runnable: the idle point.
        # One that does not: a task is runnable, or a task waits for the
        # idle point itself (trio.testing.wait_all_tasks_blocked), so ask
        # the run queue, unless we already know we made a task runnable.
        idle = timeout > 0 or (not runnable and stats().tasks_runnable == 0)
        now = self.now()
        ripe = math.inf if idle else now - FLUSH_WAIT
        armed = math.inf  # the first timer a flush moved earlier
        woke = False  # whether a flush may have made a task runnable
        self._added = False
        for sock in list(sockets):
            left, may_wake, earlier = sock.flush_ripe(ripe)
            if not left:
                del sockets[sock]
            woke = woke or may_wake
            if earlier < armed:
                armed = earlier
        if timeout > 0 and (
            armed < now + timeout
            # A flush that marked another socket (a carrier's) left it for
            # the next round: that must come at once, as for a wake.
            or self._added
            or self.runnable
            or (woke and stats().tasks_runnable)
        ):
            trio.lowlevel.current_trio_token().run_sync_soon(_wake_loop)
        # What a flush woke runs in the next batch, before the next poll.
        self.runnable = False


_idle_flush: trio.lowlevel.RunVar[_IdleFlush] = trio.lowlevel.RunVar("_idle_flush")


def _idle_flusher() -> _IdleFlush:
    """This run's :class:`_IdleFlush`, installed on first use."""
    try:
        return _idle_flush.get()
    except LookupError:
        flusher = _IdleFlush()
        trio.lowlevel.add_instrument(flusher)
        _idle_flush.set(flusher)
        return flusher


class _InitialHandler(Protocol):
    def handle_initial(
        self, header: _binding.Header, data: memoryview, address: SockAddr
    ) -> None: ...


@attrs.define
class SocketStatistics:
    """Counters of a :class:`QUICSocket`."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    #: Datagrams that did not parse as QUIC (e.g. hole-punching packets).
    dropped_not_quic: int = 0
    #: QUIC packets for connection ids we do not know.
    dropped_unknown_connection: int = 0
    #: Datagrams under 1200 bytes naming a version we do not speak: never
    #: answered with version negotiation (RFC 9000 5.2.2).
    dropped_short_unknown_version: int = 0
    #: Initials that arrived while no server was attached.
    dropped_no_server: int = 0
    #: Packets for a known connection that quiche refused (malformed, or a
    #: protocol violation: then quiche closes the connection).
    dropped_by_quiche: int = 0
    #: Sends the kernel refused for lack of buffer space (then retried).
    send_would_block: int = 0
    #: Reads of the socket (recvmmsg calls, each for what is queued).
    reads: int = 0
    #: Receives that failed (ICMP errors reported on the socket).
    receive_errors: int = 0
    #: Sends that failed outright (unreachable network and the like).
    send_errors: int = 0
    #: Connections quiche closed with STREAM_LIMIT_ERROR: the peer opened
    #: more streams than we allow (``initial_max_streams_*``).
    refused_streams: int = 0
    #: Bugs caught in the QUIC layer: a verifier or a connection's callback
    #: (the application's) that raised, or a bug of ours in one
    #: connection's input or driver (that connection is closed with
    #: INTERNAL_ERROR). Each logged at WARNING (``polykey.quic``) with the
    #: peer; none ends the socket.
    unexpected_errors: int = 0
    gso: bool = False
    gro: bool = False
    connections: int = 0
    #: Virtual paths open (a relayed connection's path, VirtualPath).
    virtual_paths: int = 0


#: Distinct sources one :class:`StrayWatch` keeps (a peer has few mappings).
MAX_STRAY_SOURCES: Final = 8


class StrayWatch:
    """The sources of datagrams from ``host`` that no connection took.

    Made by :meth:`QUICSocket.watch_strays`. ``sources`` lists distinct
    ``(host, port)`` in arrival order (at most :data:`MAX_STRAY_SOURCES`);
    :meth:`wait_source` waits for the ``n``-th.
    """

    def __init__(self, host: str) -> None:
        self.host = unmap_ipv4(host)
        self.sources: list[Address] = []
        self._lot = trio.lowlevel.ParkingLot()

    def note(self, address: SockAddr) -> None:
        source = (unmap_ipv4(str(address[0])), int(address[1]))
        if source not in self.sources and len(self.sources) < MAX_STRAY_SOURCES:
            self.sources.append(source)
            self._lot.unpark_all()

    async def wait_source(self, n: int) -> Address:
        """The ``n``-th source (0-based), waiting until it is seen."""
        while len(self.sources) <= n:
            await self._lot.park()
        return self.sources[n]


class VirtualPath:
    """A path for QUIC packets that is not the UDP socket: a relayed
    connection's packets travel inside another connection (polykey.nodes'
    relay). Made by :meth:`QUICSocket.open_virtual_path`.

    ``address`` stands where the peer's UDP address would (a reserved
    240.0.0.0/8 address, unique on this socket): a connection dialled to it,
    or accepted from it, is an ordinary QUICConnection. What quiche sends
    there goes to ``send(packet)``; what arrives for it is handed in with
    :meth:`deliver`.

    With a ``carrier`` instead of ``send``, packets travel as the carrier's
    DATAGRAM frames ``prefix || packet`` both ways, routed in C (see
    polykey.quic._carrier): a send batch is queued in one call, and once a
    connection on the path has had a short-header packet delivered, the
    carrier's frames for it reach it without Python. The rest (handshake
    packets, empty frames) still goes through the carrier's ``on_datagram``
    handler, which hands it to :meth:`deliver`.
    """

    def __init__(
        self,
        socket: QUICSocket,
        address: SockAddr,
        send: Callable[[bytes], bool] | None,
        carrier: QUICConnection | None = None,
        prefix: bytes = b"",
    ) -> None:
        self._socket = socket
        self.address = address
        self._send = send
        self._carrier = carrier
        self._prefix = prefix
        self._scratch = bytearray(len(prefix) + 65536) if carrier is not None else None
        self.closed = False
        self.packets_sent = 0
        self.packets_received = 0
        self.packets_dropped = 0

    def send_segments(self, data: memoryview, segment: int) -> None:
        """Send the packets of a send batch (``segment`` bytes each, the
        last may be shorter)."""
        if self.closed:
            return
        carrier = self._carrier
        if carrier is None:
            assert self._send is not None
            for start in range(0, len(data), segment):
                if self._send(bytes(data[start : start + segment])):
                    self.packets_sent += 1
                else:
                    self.packets_dropped += 1
            return
        count = -(-len(data) // segment)
        queued = 0
        if not carrier.closed and carrier.verified:
            assert self._scratch is not None
            try:
                queued = carrier.quiche.dgram_send_segments(
                    self._prefix, data, segment, self._scratch
                )
            except ValueError:  # a packet too big for a frame: dropped
                queued = 0
        self.packets_sent += queued
        self.packets_dropped += count - queued
        if queued:
            carrier.flush_later()

    def deliver(self, packet: bytes) -> None:
        """A packet from the peer: routed as if it had arrived at the socket
        from ``address``. Processed once the input being processed now is
        (packets delivered together are handled together), or at once."""
        if self.closed:
            return
        self.packets_received += 1
        socket = self._socket
        # quiche decrypts in place: give it a buffer of its own.
        socket.inject(memoryview(bytearray(packet)), self.address)
        if self._carrier is not None and packet and not packet[0] & 0x80:
            # A short header: the connection it is for takes the next ones
            # straight from the carrier.
            dcid = packet[1 : 1 + CID_LEN]
            conn = socket.connection_for(dcid)
            if conn is not None and conn.remote_address == self.address:
                try:
                    self._carrier.carry_to(self._prefix, conn, dcid)
                except ValueError:
                    pass  # the prefix is routed otherwise: stay in Python
        socket.process_input()  # a no-op inside processing: done after it

    def close(self) -> None:
        """Stop carrying packets; connections on the path then time out, or
        are closed by whoever closes the path."""
        if not self.closed:
            self.closed = True
            self._socket.drop_virtual_path(self.address)
            if self._carrier is not None:
                self._carrier.stop_carrying(self._prefix)


class Timer:
    """A connection's place in its socket's timer queue; cancelling it lets
    go of the connection at once (a closed connection is not kept until its
    last deadline)."""

    __slots__ = ("conn",)

    def __init__(self, conn: QUICConnection) -> None:
        self.conn: QUICConnection | None = conn

    def cancel(self) -> None:
        self.conn = None


class QUICSocket:
    """A UDP socket for QUIC, used as ``async with QUICSocket(...) as sock``.

    ``host`` defaults to ``"::"`` with dual stack (IPv4 peers appear as
    ``::ffff:a.b.c.d``); pass ``"0.0.0.0"`` or ``"127.0.0.1"`` for IPv4 only.
    """

    def __init__(self, host: str = "::", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._sock: _stdlib_socket.socket | None = None
        self._nursery: trio.Nursery | None = None
        # Holds the nursery between __aenter__ and __aexit__.
        self._stack = contextlib.AsyncExitStack()
        self._routes: dict[bytes, QUICConnection] = {}
        # The connection ids routed to each connection, so that removing it
        # drops them all (a tuple: one or two ids, 40 bytes less than a list).
        self._route_ids: dict[QUICConnection, tuple[bytes, ...]] = {}
        self._server: _InitialHandler | None = None
        self._dirty: list[QUICConnection] = []
        self._processing = False
        # Connections whose flush waits until nothing else can run (see
        # flush_later), each with trio's clock when it was marked; in
        # marking order.
        self._flush_due: dict[QUICConnection, float] = {}
        # Connections whose flush waits only for the scheduler's next poll
        # (see flush_soon): flushed before it, busy or idle.
        self._flush_soon: dict[QUICConnection, None] = {}
        self._idle_flush: _IdleFlush | None = None
        # Every connection's one timer: (deadline, order, Timer), the
        # earliest first. A connection that re-arms pushes again and cancels
        # the Timer it replaced, which is skipped when it comes up.
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_order = itertools.count()
        self._timer_scope: trio.CancelScope | None = None
        # Connections whose batch the kernel refused, waiting for room.
        self._refused: dict[QUICConnection, None] = {}
        self._writer_running = False
        # Room for two datagrams (each a GRO batch of up to 64 KiB): a read
        # of one then says the queue is empty (see _reader).
        self._recv = _binding.DatagramReader(_RECV_SLOTS, _RECV_BUFFER)
        # One send buffer for all connections: sending is synchronous. A GSO
        # send carries at most 64 KiB; quiche fills what fits. Connections
        # fill it in their flush (see "Internal interfaces" in docs/quic.md).
        self.send_buffer = bytearray(_GSO_BYTES)
        self.send_view = memoryview(self.send_buffer)
        self.max_segments = MAX_GSO_SEGMENTS
        # Stream reads copy out of quiche through here; one per socket, as
        # reads are synchronous (an idle connection must stay cheap).
        self._scratch = bytearray(_RECV_BUFFER)
        #: :meth:`scratch`, bound once: every connection keeps this one
        #: object (a bound method of its own cost each 64 bytes).
        self.bound_scratch: Callable[[int], bytearray] = self.scratch
        #: :meth:`schedule_point`, bound once, for the same reason.
        self.bound_schedule_point: Callable[[], Awaitable[None]] = self.schedule_point
        #: trio's clock, read without ``trio.current_time()``'s two wrappers
        #: (three Python calls a read, about seven reads a call): the run's
        #: clock's own ``current_time``, bound when the socket opens.
        self.now: Callable[[], float] = trio.current_time
        self._gso = False
        self._closed = False
        self._connections: set[QUICConnection] = set()
        self._stray_watches: dict[str, list[StrayWatch]] = {}
        self._virtual: dict[SockAddr, VirtualPath] = {}
        self._virtual_next = 0
        self.statistics = SocketStatistics()
        self.local_address: SockAddr = ()

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> QUICSocket:
        if self._sock is not None:
            raise RuntimeError("a QUICSocket can be opened once")
        _refuse_autojump_clock()
        sock = _open_udp(self._host, self._port)
        self._gso = _probe_gso(sock)
        self._sock = sock
        self.local_address = sock.getsockname()
        self.statistics.gso = self._gso
        self.statistics.gro = _enable_gro(sock)
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._idle_flush = _idle_flusher()
        self.now = self._idle_flush.now
        self._nursery.start_soon(self._reader)
        self._nursery.start_soon(self._timer)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._close()
        return bool(await self._stack.__aexit__(exc_type, exc_value, traceback))

    async def aclose(self) -> None:
        """Close every connection on this socket (with code 0), then the
        socket itself. Idempotent."""
        self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._connections):
            conn.close(0, b"socket closing")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if self._idle_flush is not None:
            self._idle_flush.discard(self)
        self._flush_due.clear()
        self._flush_soon.clear()
        if self._sock is not None:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None or self._closed:
            raise trio.ClosedResourceError("the QUIC socket is not open")
        return self._nursery

    @property
    def host_family(self) -> int:
        assert self._sock is not None
        return self._sock.family

    # -- routing ----------------------------------------------------------------

    def attach_server(self, server: _InitialHandler | None) -> None:
        """Send new connections' Initials to ``server`` (or to nobody)."""
        if (
            server is not None
            and self._server is not None
            and server is not self._server
        ):
            raise trio.BusyResourceError("a server is already attached to this socket")
        self._server = server

    # -- internal interface: connections, the server and the client ---------
    # (see "Internal interfaces" in docs/quic.md)

    def add_connection(self, conn: QUICConnection) -> None:
        """Count ``conn`` as live on this socket (until :meth:`remove_connection`);
        closing the socket closes it."""
        self._connections.add(conn)
        self.statistics.connections = len(self._connections)

    def remove_connection(self, conn: QUICConnection) -> None:
        """Forget ``conn`` (ended) and every connection id routed to it."""
        reason = conn.close_reason
        if (
            reason is not None
            and reason.kind is CloseKind.PROTOCOL
            and not reason.is_app
            and reason.code == TransportErrorCode.STREAM_LIMIT_ERROR
        ):
            self.statistics.refused_streams += 1
        self._connections.discard(conn)
        for cid in self._route_ids.pop(conn, ()):
            if self._routes.get(cid) is conn:
                del self._routes[cid]
        self.statistics.connections = len(self._connections)

    def route(self, cid: bytes, conn: QUICConnection) -> None:
        """Deliver packets addressed to ``cid`` to ``conn``."""
        self._routes[cid] = conn
        ids = self._route_ids
        ids[conn] = (*ids.get(conn, ()), cid)

    def scratch(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, valid until the next await."""
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        return self._scratch

    async def schedule_point(self) -> None:
        """The schedule point that ends a stream operation which did not
        wait (trio's ``cancel_shielded_checkpoint``, after the operation's
        ``checkpoint_if_cancelled``), noted for the idle flush: the task
        is runnable until the next poll, so that poll is not the idle point
        (see :class:`_IdleFlush`)."""
        flusher = self._idle_flush
        if flusher is not None:
            flusher.runnable = True
        await trio.lowlevel.cancel_shielded_checkpoint()

    def note_runnable(self, tasks: int = 1) -> None:
        """A connection's input just woke ``tasks`` tasks (a stream's reader,
        an acceptor, the task a stream handed over starts): they are
        runnable until the next poll, and run in one batch after it (see
        :class:`_IdleFlush`)."""
        flusher = self._idle_flush
        if flusher is not None:
            flusher.runnable = True
            flusher.woken += tasks

    def small_write_waits(self) -> bool:
        """Whether a small write made with nothing runnable waits for the
        rest of the scheduler's batch running now (``flush_soon``): it does
        when the batch holds more tasks our input woke than one, or when
        another small write already went alone in it. When it does not, it
        goes at once, and is that write for the rest of the batch.

        Tasks resumed together by anything but our input (an Event, RPC
        handlers that waited) are not in trio's run queue either: the first
        of them writes alone, the rest together.
        """
        flusher = self._idle_flush
        if flusher is None:
            return False
        if flusher.companions:
            return True
        flusher.companions = True
        return False

    def tasks_runnable(self) -> bool:
        """Whether another task of this run is waiting to run (a yield at
        :meth:`schedule_point`, or a task input woke, since the last poll
        says so without asking trio)."""
        flusher = self._idle_flush
        if flusher is not None and flusher.runnable:
            return True
        return trio.lowlevel.current_statistics().tasks_runnable > 0

    def normalize_address(self, address: Address) -> SockAddr:
        """``address`` as this socket's family reports peers: IPv4 becomes
        IPv4-mapped IPv6 on a dual-stack socket."""
        assert self._sock is not None
        return for_family(address, ipv6=self._sock.family == _stdlib_socket.AF_INET6)

    # -- receiving --------------------------------------------------------------

    async def _reader(self) -> None:
        if self._closed:
            # Closed before this task first ran: the file descriptor is gone
            # (wait_readable would raise ValueError on -1).
            return
        sock = self._sock
        assert sock is not None
        reader = self._recv
        view = reader.view
        slot = reader.slot
        slots = reader.slots
        stats = self.statistics
        dispatch = self._dispatch
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                # One recvmmsg: what is queued, up to `slots` datagrams.
                # Fewer means the queue is empty: a wake-up for one datagram
                # is one syscall, not a second failing with EAGAIN.
                stats.reads += 1
                try:
                    got = reader.read(sock.fileno())
                except OSError as exc:
                    if self._closed or exc.errno == errno.EBADF:
                        return
                    # ICMP errors surface here (ECONNREFUSED and the like);
                    # they concern one peer, never the socket.
                    stats.receive_errors += 1
                    break
                for i in range(got):
                    n, segment, address = reader.datagram(i)
                    start = i * slot
                    stats.bytes_received += n
                    if not segment or segment >= n:
                        stats.datagrams_received += 1
                        dispatch(view[start : start + n], address)
                    else:
                        stats.datagrams_received += -(-n // segment)
                        self._dispatch_segments(
                            view[start : start + n], segment, address
                        )
                if got < slots:
                    break
            self._process_dirty()

    def _dispatch_segments(
        self, data: memoryview, segment: int, address: SockAddr
    ) -> None:
        """A GRO buffer: packets of one sender, ``segment`` bytes each. Runs
        of short-header packets for one connection go to quiche in one call;
        anything else is dispatched packet by packet."""
        n = len(data)
        start = 0
        routes = self._routes
        while start < n:
            first = data[start : start + segment]
            if not first[0] & 0x80:
                dcid = bytes(first[1 : 1 + CID_LEN])
                conn = routes.get(dcid)
                if conn is not None:
                    used = conn.segments_received(data[start:], segment, dcid, address)
                    if used:
                        start += used
                        continue
            self._dispatch(first, address)
            start += segment

    def _dispatch(self, data: memoryview, address: SockAddr) -> None:
        # quiche decrypts in place: ``data`` is a view of our receive buffer,
        # used up before the next read.
        if data and not data[0] & 0x80:
            # Short header: the DCID is ours, CID_LEN bytes after the flags.
            conn = self._routes.get(bytes(data[1 : 1 + CID_LEN]))
            if conn is not None:
                conn.datagram_received(data, address)
                return
        try:
            header = _binding.parse_header(data, CID_LEN)
        except (QuicheError, ValueError):
            self.statistics.dropped_not_quic += 1
            if self._stray_watches:
                self._note_stray(address)
            return
        conn = self._routes.get(header.dcid)
        if conn is not None:
            conn.datagram_received(data, address)
        elif header.type is not _binding.PacketType.VERSION_NEGOTIATION and (
            not _binding.version_is_supported(header.version)
        ):
            # Type bits are version-specific (QUIC v2's Initial reads as
            # 0-RTT in v1): any long header of a version we do not speak may
            # ask for version negotiation, but only in a datagram big
            # enough to start a connection (RFC 9000 5.2.2). A smaller one
            # is noise (hole punching), and answering it would make us a
            # reflector: 8 spoofed bytes in, 11 out.
            if len(data) < _binding.MIN_CLIENT_INITIAL_LEN:
                self.statistics.dropped_short_unknown_version += 1
                if self._stray_watches:
                    self._note_stray(address)
            elif self._server is None:
                self.statistics.dropped_no_server += 1
            else:
                self._to_server(header, data, address)
        elif header.type is _binding.PacketType.INITIAL:
            if self._server is None:
                self.statistics.dropped_no_server += 1
            else:
                self._to_server(header, data, address)
        else:
            self.statistics.dropped_unknown_connection += 1
            if self._stray_watches:
                self._note_stray(address)

    def _to_server(
        self, header: _binding.Header, data: memoryview, address: SockAddr
    ) -> None:
        assert self._server is not None
        try:
            self._server.handle_initial(header, data, address)
        except Exception:
            # A stranger's packet must not find a way to end the socket.
            self.statistics.unexpected_errors += 1
            _log.warning(
                "the server's handling of an Initial failed unexpectedly (peer %s:%s)",
                *address[:2],
                exc_info=True,
            )

    def _note_stray(self, address: SockAddr) -> None:
        for watch in self._stray_watches.get(unmap_ipv4(str(address[0])), ()):
            watch.note(address)

    @contextmanager
    def watch_strays(self, host: str) -> Iterator[StrayWatch]:
        """Note where datagrams from ``host`` that no connection takes come
        from, while the block runs (see :class:`StrayWatch`)."""
        watch = StrayWatch(host)
        self._stray_watches.setdefault(watch.host, []).append(watch)
        try:
            yield watch
        finally:
            watches = self._stray_watches[watch.host]
            watches.remove(watch)
            if not watches:
                del self._stray_watches[watch.host]

    def inject(self, data: memoryview, address: SockAddr) -> None:
        """Route ``data`` as if it had arrived from ``address`` (a virtual
        path's packet); :meth:`process_input` then acts on it. quiche
        decrypts in place: ``data`` must be the caller's to spend."""
        self._dispatch(data, address)

    def process_input(self) -> None:
        """Let the connections that took input act on it (after_input), now,
        or with the input being processed if called during it."""
        self._process_dirty()

    def connection_for(self, cid: bytes) -> QUICConnection | None:
        """The connection packets for ``cid`` are routed to, if any."""
        return self._routes.get(cid)

    def mark_dirty(self, conn: QUICConnection) -> None:
        """``conn`` took input: call its ``after_input`` once this socket's
        input is processed."""
        self._dirty.append(conn)

    def _process_dirty(self) -> None:
        # Processing one connection's input may feed others (a relayed
        # connection's packets arrive in its relay connection's datagrams,
        # delivered from that one's after_input): go on until none is left,
        # so each connection handles a batch of packets in one go.
        if self._processing:
            return
        self._processing = True
        try:
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                seen: set[int] = set()
                for conn in dirty:
                    if id(conn) not in seen:
                        seen.add(id(conn))
                        try:
                            conn.after_input(defer_flush=True)
                        except Exception:
                            # One connection's bug must not end the reader,
                            # and with it the socket.
                            conn.fail_unexpectedly("processing its input")
        finally:
            self._processing = False

    def flush_later(self, conn: QUICConnection) -> None:
        """Call ``conn.flush_after_input()`` once this process has nothing
        else to run, or within two :data:`FLUSH_WAIT` of a process that
        never idles, unless a flush of its own makes it moot.

        What waits here is what no task waits on: ACKs, credit that reads
        returned, small writes waiting for company. Sent at once each
        costs a packet; held until every task is blocked (trio's idle
        point: the run queue is empty), it rides on whatever the woken
        tasks send meanwhile (an RPC reply takes the request's ACK, a
        server's next reply the ACK of the last call's FIN), and what is
        left leaves together. The flushes run in the scheduler's step
        before its I/O poll (:class:`_IdleFlush`); a process that never
        idles (both ends of a busy exchange in one process) flushes, in
        that step, the marks older than FLUSH_WAIT by trio's clock.
        """
        due = self._flush_due
        if conn in due or self._closed:
            return
        if not due and self._idle_flush is not None:
            self._idle_flush.add(self)
        due[conn] = self.now()

    def flush_soon(self, conn: QUICConnection) -> None:
        """Call ``conn.flush_after_input()`` just before the scheduler's
        next poll for I/O, whether the process is idle then or not.

        For a small write made while other tasks our input woke run in the
        same batch (:meth:`small_write_waits`): it leaves with their writes
        (a task's own batch is invisible to ``current_statistics()``, which
        counts only the next one: 64 RPC call tasks started by one packet
        of requests each wrote their reply into a packet of its own), and
        still before the poll, so nothing that poll could bring waits on
        it."""
        soon = self._flush_soon
        if conn in soon or self._closed:
            return
        if not soon and not self._flush_due and self._idle_flush is not None:
            self._idle_flush.add(self)
        soon[conn] = None

    def flush_sent(self, conn: QUICConnection) -> None:
        """``conn`` just sent what quiche had (and re-armed its timer)."""
        # The deferred flush has nothing left to do, and a stale mark would
        # flush a later input's ACK too early, before its answer. Unless
        # quiche closed the connection: noticing that is the deferred
        # flush's job.
        due, soon = self._flush_due, self._flush_soon
        if (conn in due or conn in soon) and not conn.quiche.is_closed():
            due.pop(conn, None)
            soon.pop(conn, None)

    def set_timer(self, conn: QUICConnection, deadline: float) -> Timer:
        """Call ``conn.timer_due()`` once trio's clock reaches ``deadline``,
        unless the returned :class:`Timer` is cancelled first."""
        timer = Timer(conn)
        if deadline == math.inf:
            return timer
        timers = self._timers
        live = len(self._connections)
        if len(timers) > live + (live >> 2) + 64:
            # Cancelled entries stay until they come due, seconds later for
            # an idle timeout: keep them under a quarter of the live ones
            # (a pass per quarter's pushes; in place: the timer task holds
            # the list).
            timers[:] = [entry for entry in timers if entry[2].conn is not None]
            heapq.heapify(timers)
        heapq.heappush(timers, (deadline, next(self._timer_order), timer))
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        return timer

    async def _timer(self) -> None:
        timers = self._timers
        try:
            while True:
                with trio.CancelScope(
                    deadline=timers[0][0] if timers else math.inf
                ) as scope:
                    self._timer_scope = scope
                    await trio.sleep_forever()
                self._timer_scope = None
                # The ones due now; what they arm, even for now, waits for
                # the next pass (after a checkpoint: a timer due again at
                # once cannot starve the other tasks).
                now = trio.current_time()
                due = []
                while timers and timers[0][0] <= now:
                    due.append(heapq.heappop(timers))
                for _, _, timer in due:
                    conn = timer.conn
                    if conn is not None:
                        try:
                            conn.timer_due()
                        except Exception:
                            # One connection's bug must not end the timer
                            # task, and with it every connection's timers.
                            conn.fail_unexpectedly("its timer")
        finally:
            self._timer_scope = None
            # Cancelled with the socket's nursery: nothing drives the
            # connections any more.
            for conn in list(self._connections):
                conn.socket_lost()

    def send_refused(self, conn: QUICConnection) -> None:
        """The kernel refused ``conn``'s batch: call ``conn.retry_send()``
        when the socket is writable, until it returns True."""
        self._refused[conn] = None
        if not self._writer_running and self._nursery is not None and not self._closed:
            self._writer_running = True
            self._nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        # Started when a send is refused, gone once every refused batch
        # went: one task waits for the socket, not one per connection.
        refused = self._refused
        try:
            while refused:
                await self.wait_writable()
                for conn in list(refused):
                    try:
                        sent = conn.closed or conn.retry_send()
                    except Exception:
                        conn.fail_unexpectedly("resending a refused batch")
                        sent = True
                    if sent:
                        del refused[conn]
                    else:
                        break  # the buffer is full again
        finally:
            self._writer_running = False

    def flush_ripe(self, ripe: float) -> tuple[bool, bool, float]:
        """Flush the connections marked by ``ripe`` (trio's clock; inf: all
        of them); returns whether any is left, whether the flushes may
        have made a task runnable (see :class:`_IdleFlush`), and the first
        timer if they moved it earlier (else inf).

        A flush wakes tasks only where it ends a connection (quiche closed
        it: its waiters wake, its callbacks run), starts the writer task (the
        kernel refused a batch) or sends on a virtual path (its ``send`` is
        the application's, and a carried path may deliver in this process);
        anything else it does (send, arm a timer) wakes nobody."""
        due = self._flush_due
        live = len(self._connections)
        writing = self._writer_running
        timers = self._timers
        known = timers[0][0] if timers else math.inf
        flushed = False
        left = False
        soon = self._flush_soon
        # The flush_soon marks first, whenever there are any: one a flush
        # here makes is flushed in this pass too, not stranded once the
        # socket leaves the instrument's list.
        while soon or due:
            if soon:
                conn = next(iter(soon))
                del soon[conn]
                due.pop(conn, None)
            else:
                conn, marked = next(iter(due.items()))
                if marked > ripe:
                    left = True
                    break
                del due[conn]
            flushed = True
            try:
                conn.flush_after_input()
            except Exception:
                # Outside any task: one connection's bug must not reach
                # trio's scheduler (which would drop the instrument, and
                # every socket's deferred flushes with it).
                conn.fail_unexpectedly("its deferred flush")
        may_wake = flushed and (
            bool(self._virtual)
            or len(self._connections) != live
            or self._writer_running != writing
        )
        first = timers[0][0] if timers else math.inf
        return left, may_wake, first if first < known else math.inf

    # -- sending ----------------------------------------------------------------

    def drop_virtual_path(self, address: SockAddr) -> None:
        """Stop sending to the virtual path at ``address`` (it closed)."""
        self._virtual.pop(address, None)
        self.statistics.virtual_paths = len(self._virtual)

    def open_virtual_path(
        self,
        send: Callable[[bytes], bool] | None = None,
        *,
        carrier: QUICConnection | None = None,
        prefix: bytes = b"",
    ) -> VirtualPath:
        """A new :class:`VirtualPath` whose packets go to ``send``, or travel
        as ``carrier``'s DATAGRAM frames after ``prefix``."""
        if (send is None) == (carrier is None):
            raise ValueError("a virtual path needs one of send and carrier")
        if carrier is not None and not prefix:
            raise ValueError("a carried path needs a prefix")
        n = self._virtual_next = self._virtual_next + 1
        if n >= 1 << 24:
            raise RuntimeError("virtual path addresses exhausted")
        host = f"240.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        address = self.normalize_address((host, 9))
        path = self._virtual[address] = VirtualPath(
            self, address, send, carrier, prefix
        )
        self.statistics.virtual_paths = len(self._virtual)
        return path

    def send_segments(self, data: memoryview, segment: int, address: SockAddr) -> bool:
        """Send ``data`` as packets of ``segment`` bytes (the last may be
        shorter) to ``address``. Returns False if the kernel's buffer is full
        and nothing was sent; other send errors are counted and swallowed
        (UDP is lossy; QUIC recovers)."""
        sock = self._sock
        if sock is None or self._closed:
            return True
        if self._virtual:
            path = self._virtual.get(address)
            if path is not None:
                path.send_segments(data, segment)
                return True
        stats = self.statistics
        n = len(data)
        try:
            if n <= segment:
                sock.sendto(data, address)
                stats.datagrams_sent += 1
            elif self._gso:
                sock.sendmsg(
                    [data],
                    [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", segment))],
                    0,
                    address,
                )
                stats.datagrams_sent += -(-n // segment)
            else:
                for start in range(0, n, segment):
                    sock.sendto(data[start : start + segment], address)
                    stats.datagrams_sent += 1
        except BlockingIOError:
            stats.send_would_block += 1
            return False
        except OSError as exc:
            if exc.errno == errno.EIO and self._gso:
                # Some devices refuse GSO at send time: fall back for good.
                self._gso = stats.gso = False
                return self.send_segments(data, segment, address)
            stats.send_errors += 1
            return True
        stats.bytes_sent += n
        return True

    async def wait_writable(self) -> None:
        assert self._sock is not None
        await trio.lowlevel.wait_writable(self._sock)

    async def send(self, data: bytes, address: Address) -> None:
        """Send one raw datagram (hole punching). Waits while the kernel's
        buffer is full."""
        if self._closed or self._sock is None:
            raise trio.ClosedResourceError("the QUIC socket is closed")
        peer = self.normalize_address(address)
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                self._sock.sendto(data, peer)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            self.statistics.datagrams_sent += 1
            self.statistics.bytes_sent += len(data)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return


def _refuse_autojump_clock() -> None:
    """quiche reads the real monotonic clock; an autojumping MockClock would
    make every QUIC timer fire at once in virtual time while quiche still
    waits in real time, so the timer task would spin. Refuse clearly instead."""
    clock = trio.lowlevel.current_clock()
    if (
        isinstance(clock, trio.testing.MockClock)
        and clock.autojump_threshold != math.inf
    ):
        raise RuntimeError(
            "QUIC runs on the real clock (quiche reads it itself): run QUIC on "
            "trio's default clock, or on a MockClock without autojump; for "
            "deterministic tests above QUIC use polykey.testing's in-memory "
            "transports (see docs/quic.md)"
        )


def _open_udp(host: str, port: int) -> _stdlib_socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)``; dual stack for
    an IPv6 ``host``."""
    family = _stdlib_socket.AF_INET6 if ":" in host else _stdlib_socket.AF_INET
    sock = _stdlib_socket.socket(family, _stdlib_socket.SOCK_DGRAM)
    try:
        if family == _stdlib_socket.AF_INET6:
            sock.setsockopt(_stdlib_socket.IPPROTO_IPV6, _stdlib_socket.IPV6_V6ONLY, 0)
        for opt in (_stdlib_socket.SO_RCVBUF, _stdlib_socket.SO_SNDBUF):
            try:
                sock.setsockopt(_stdlib_socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:  # pragma: no cover - best effort
                pass
        try:
            sock.bind((host, port))
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host
            raise OSError(
                exc.errno, f"cannot listen on UDP {shown}:{port}: {exc.strerror}"
            ) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _probe_gso(sock: _stdlib_socket.socket) -> bool:
    try:
        sock.getsockopt(_SOL_UDP, _UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: _stdlib_socket.socket) -> bool:
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True
