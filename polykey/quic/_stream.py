"""QUIC streams as trio half-closeable streams.

A :class:`QUICStream` is a thin view of one quiche stream. Data never waits
in Python: ``send_all`` hands bytes to quiche, which buffers at most the
peer's flow-control credit, and waits (parks) when quiche takes nothing;
``receive_some`` reads straight out of quiche and parks when there is
nothing to read. The connection wakes the parked tasks after each batch of
input.

Closing follows trio's contract: ``send_eof`` sends FIN; ``aclose`` is
graceful (FIN on the write side, STOP_SENDING with code 0 on an unfinished
read side) unless it runs in a cancelled scope, when it is forceful
(RESET_STREAM and STOP_SENDING with ``cancel_code``). A ``send_all``
cancelled after part of its data went out resets the stream too, since the
peer could never tell where the data stopped. ``close_dropping_input`` is
graceful without the STOP_SENDING: the rest of the peer's input is dropped
as it arrives, up to its FIN, with no task waiting for it.

``watch_input`` hands input that arrives while no task waits to read to a
callback, run by the connection from the socket's reader: a side that must
notice the peer's FIN or reset while it works, but has nothing to wait for
in a task of its own (an RPC server's call whose handler waits), reads it
there with ``receive_nowait``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import trio
from trio.lowlevel import Abort

from ._binding import Shutdown
from ._errors import QuicheError, QUICStreamError, StreamReset, StreamStopped

if TYPE_CHECKING:
    from ._connection import QUICConnection

__all__ = ["QUICStream"]

_DEFAULT_RECEIVE = 65536
#: A write at most this long may wait for company (see _send).
_SMALL_WRITE = 1200


def _receive_size(max_bytes: int | None) -> int:
    if max_bytes is None:
        return _DEFAULT_RECEIVE
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise TypeError("max_bytes must be an integer or None")
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


class _ConflictDetector:
    """Refuses a second task using one direction of a stream while a first
    does (trio's ``ConflictDetector``): ``with detector:`` around the use.
    One subclass per direction carries the message; made without an
    ``__init__``, as every stream makes two.

    The one task that holds it waits here too (:meth:`park`, :meth:`wake`):
    one task at most, so a slot rather than a ParkingLot, whose OrderedDict
    and frames cost each stream about 20 Python calls over a unary call
    (made, parked on once, woken, emptied at close)."""

    message: ClassVar[str]
    _held = False
    _parked: trio.lowlevel.Task | None = None

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self.message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._held = False

    async def park(self) -> None:
        """Wait (holding the detector) until :meth:`wake`; a checkpoint."""
        task = self._parked = trio.lowlevel.current_task()

        def abort(_: object) -> Abort:
            if self._parked is task:
                self._parked = None
            return Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> bool:
        """Wake the parked task, if any; returns whether there was one."""
        task = self._parked
        if task is None:
            return False
        self._parked = None
        trio.lowlevel.reschedule(task)
        return True


class _ReceiveConflict(_ConflictDetector):
    message = "another task is receiving on this stream"


class _SendConflict(_ConflictDetector):
    message = "another task is sending on this stream"


class QUICStream(trio.abc.HalfCloseableStream):
    """One bidirectional or unidirectional QUIC stream.

    ``cancel_code`` is the application error code sent when the stream is
    reset because of cancellation or a forceful close (settable; the RPC
    layer uses its own codes).
    """

    def __init__(
        self, conn: QUICConnection, stream_id: int, *, can_read: bool, can_write: bool
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.cancel_code = 0
        # Who uses each direction, and where it waits.
        self._receive_conflict = _ReceiveConflict()
        self._send_conflict = _SendConflict()
        self._eof_received = not can_read
        self._fin_sent = not can_write
        self._closed = False
        self._recv_error: BaseException | None = None
        self._send_error: BaseException | None = None
        # Set when we reset our own write side (a cancelled send_all).
        self._send_aborted = False
        # The last thing done on the stream was a small write (see _send).
        self._writing = False
        # Told of input no task waits for (watch_input).
        self._input_watcher: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<QUICStream {self.stream_id} of {self._conn!r}>"

    @property
    def connection(self) -> QUICConnection:
        return self._conn

    @property
    def fin_received(self) -> bool:
        """The peer's FIN has been read (with the last data, or alone): the
        next :meth:`receive_some` returns ``b""`` at once. (The RPC layer's
        ``EagerStream``: a reply with its FIN ends a call without another
        read.)"""
        return self._eof_received and self._recv_error is None and not self._closed

    # -- receiving ------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = _receive_size(max_bytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._receive_conflict:
            data = self._receive_ready(max_bytes)
            if data is None:
                # Waiting is the checkpoint.
                return await self._receive_waiting(max_bytes)
        # Otherwise yield once, as trio's own sockets do: one scheduling
        # round less per message when waiting.
        await self._conn.schedule_point()
        return data

    def receive_nowait(self, max_bytes: int | None = None) -> bytes:
        """What :meth:`receive_some` returns when it need not wait, without
        its checkpoint; raises :exc:`trio.WouldBlock` when it would wait.

        For a caller that has just passed a schedule point of its own (the
        RPC layer reads a request with it in a call task's first step).
        """
        max_bytes = _receive_size(max_bytes)
        with self._receive_conflict:
            data = self._receive_ready(max_bytes)
        if data is None:
            raise trio.WouldBlock
        return data

    def watch_input(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` whenever input arrives while no task waits in
        :meth:`receive_some`: data, the peer's FIN or reset, or the end of
        the connection. ``None`` stops it; so does closing the stream.

        The connection calls it from the socket's reader, synchronously,
        once per batch of input while the input lasts: it reads what is
        there with :meth:`receive_nowait` (until :exc:`trio.WouldBlock`)
        and must not block. What was here before it was set is the
        caller's to read first. A callback that raises is logged and
        counted (``unexpected_errors``), and the stream reset.

        For a side that must notice the peer's input while it works but
        has no task to spare for it: an RPC server's call whose handler
        waits is watched so, instead of by a reader task of its own.
        """
        self._input_watcher = callback

    def _receive_ready(self, max_bytes: int) -> bytes | None:
        """The next bytes (b"" at FIN), or None if there are none yet."""
        conn = self._conn
        q = conn.quiche
        sid = self.stream_id
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if self._recv_error is not None:
                raise self._recv_error
            if self._eof_received:
                return b""
            buf = conn.scratch(max_bytes)
            try:
                got = q.stream_recv(sid, buf, max_bytes)
            except QuicheError as exc:
                raise self._translate(exc) from None
            if got is None:
                conn.raise_if_dead()
                return None
            n, fin = got
            self._writing = False
            if fin:
                self._eof_received = True
            # Reading returns flow-control credit: let quiche announce it, on
            # the next packet we send anyway (our reply, usually) or soon.
            conn.flush_later()
            if n == 0 and not fin:
                continue
            return bytes(buf[:n])

    async def _receive_waiting(self, max_bytes: int) -> bytes:
        """Park until there is something to read (holding the detector)."""
        while True:
            await self._receive_conflict.park()
            data = self._receive_ready(max_bytes)
            if data is not None:
                return data

    # -- sending --------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send_all(memoryview(data).cast("B"), fin=False)

    async def send_all_and_eof(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`send_all` then :meth:`send_eof`, with the FIN on the data's
        last packet instead of a packet of its own.

        A request or a reply that ends its stream costs one packet, not two;
        the RPC layer uses this for a call's last message.
        """
        view = memoryview(data).cast("B")
        if view:
            await self._send_all(view, fin=True)
        else:
            await self.send_eof()

    async def _send_all(self, view: memoryview, fin: bool) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._send_conflict:
            waited = await self._send(view, fin)
            if fin:
                self._fin_sent = True
        if not waited:
            # Waiting for room was the checkpoint.
            await self._conn.schedule_point()

    def send_nowait(
        self, data: bytes | bytearray | memoryview, *, eof: bool = False
    ) -> int:
        """Queue as much of ``data`` as quiche takes now, without waiting or
        a checkpoint, and return how much that was; ``eof``: the FIN goes
        with the last byte if all of it was taken (``data`` not empty).

        The rest, if any, is the caller's to send with :meth:`send_all` (or
        :meth:`send_all_and_eof`). For a caller that has just passed a
        schedule point of its own or ends right after (the RPC layer writes
        a request just after opening its stream, a unary reply with it).
        """
        view = memoryview(data).cast("B")
        if not view:
            raise ValueError("send_nowait needs data")
        with self._send_conflict:
            self._check_send()
            taken = self._queue(view, 0, eof, self._coalesce(len(view), eof))
            if eof and taken == len(view):
                self._fin_sent = True
        return taken

    def _check_send(self) -> None:
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("stream is closed for sending")
        if self._send_error is not None:
            raise self._send_error
        if self._send_aborted:
            raise trio.BrokenResourceError("stream was reset after a cancelled send")
        self._conn.raise_if_dead()

    def _stream_send(self, data: memoryview, fin: bool) -> int:
        try:
            return self._conn.quiche.stream_send(self.stream_id, data, fin)
        except QuicheError as exc:
            raise self._translate(exc) from None

    def _coalesce(self, total: int, fin: bool) -> bool:
        """Whether a write of ``total`` bytes may wait for company.

        A small write right after another (a server streaming messages)
        leaves with the deferred flush, with the writes that follow it: one
        packet for several messages instead of one each. So does any small
        write while other tasks are runnable (RPC replies, and the requests
        of calls in flight): theirs come before the next poll and share its
        packet (quiche packs several streams' frames, our change 3). A
        small write with nothing runnable goes just before the scheduler's
        next poll (``flush_soon``), with what the rest of its batch writes,
        when other tasks our input woke run in that batch (RPC call tasks
        started by one packet of requests) or another small write already
        went alone in it (handlers resumed together); else, and a large
        write, at once: a round trip waits for nothing. docs/quic.md has the figures.
        """
        coalesce = total <= _SMALL_WRITE and (
            self._writing or self._conn.tasks_runnable()
        )
        self._writing = total <= _SMALL_WRITE
        return coalesce

    def _queue(self, view: memoryview, offset: int, fin: bool, coalesce: bool) -> int:
        """Hand quiche ``view`` from ``offset`` on until it takes no more;
        returns the new offset."""
        conn = self._conn
        total = len(view)
        while offset < total:
            n = self._stream_send(view[offset:], fin)
            if not n:
                break
            offset += n
            if coalesce:
                conn.flush_small(n)
            elif total <= _SMALL_WRITE and conn.small_write_waits():
                conn.flush_soon()
            else:
                conn.flush()
        return offset

    async def _send(self, view: memoryview, fin: bool) -> bool:
        """Queue all of ``view``; returns whether we had to wait for room.

        ``view`` is not empty when ``fin`` is set: quiche takes the FIN only
        with the data's last byte, so offset == total means it is out.
        """
        self._check_send()
        conn = self._conn
        total = len(view)
        coalesce = self._coalesce(total, fin)
        offset = self._queue(view, 0, fin, coalesce)
        waited = False
        while offset < total:
            self._check_stream_exists()
            conn.add_send_waiter(self)
            try:
                await self._send_conflict.park()
            except trio.Cancelled:
                if offset:
                    # Part of the data is out: the stream cannot be resumed.
                    self._abort_send()
                raise
            finally:
                conn.discard_send_waiter(self)
            waited = True
            self._check_send()
            offset = self._queue(view, offset, fin, coalesce)
        return waited

    def _check_stream_exists(self) -> None:
        """quiche takes nothing both when it has no room and when it already
        collected the stream (after the peer reset and stopped it and we
        read the reset): tell the two apart."""
        if self._capacity() is None:
            # Gone: the peer aborted it. Its STOP_SENDING code went with it;
            # the RESET_STREAM code we read is the best we have.
            code = getattr(self._recv_error, "code", 0)
            self._send_error = QUICStreamError(self.stream_id, code, reset=False)
            raise self._send_error

    def _capacity(self) -> int | None:
        """The bytes quiche takes on this stream now; None when the stream
        does not exist in quiche (not created yet, or collected)."""
        try:
            return self._conn.quiche.stream_capacity(self.stream_id)
        except StreamStopped as exc:
            raise self._translate(exc) from None
        except QuicheError:
            return None

    def _translate(self, exc: QuicheError) -> BaseException:
        """What a quiche error from a call for this stream means to its user
        (the one place quiche's stream errors are translated; callers raise
        it ``from None``, in an ``except`` that costs nothing until quiche
        fails, unlike a context manager around every call).

        A RESET_STREAM ends the read side and a STOP_SENDING the write side
        with a :class:`QUICStreamError` that later calls raise again; any
        other quiche error means the stream is gone: the connection's error
        if it died, else ``trio.BrokenResourceError``.
        """
        sid = self.stream_id
        if isinstance(exc, StreamReset):
            self._recv_error = QUICStreamError(sid, exc.error_code, reset=True)
            self._eof_received = True
            return self._recv_error
        if isinstance(exc, StreamStopped):
            self._send_error = QUICStreamError(sid, exc.error_code, reset=False)
            return self._send_error
        # Collected after a reset we already saw, or the connection died.
        if self._conn.closed:
            return self._conn.closed_error()
        return trio.BrokenResourceError(f"stream {sid}: {exc}")

    def _abort_send(self) -> None:
        self._send_aborted = True
        self._shutdown(Shutdown.WRITE, self.cancel_code)
        self._conn.flush()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._send_conflict:
            while True:
                self._check_send()
                room = self._capacity()
                if room is None or room > 0:
                    break  # None: not created yet, or finished: send_all says
                self._conn.add_send_waiter(self)
                try:
                    await self._send_conflict.park()
                finally:
                    self._conn.discard_send_waiter(self)
        await self._conn.schedule_point()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if not self._fin_sent:
                if self._send_error is not None:
                    raise self._send_error
                self._conn.raise_if_dead()
                self._stream_send(memoryview(b""), True)
                self._fin_sent = True
                # Nothing waits on a lone FIN but the peer's clean close: it
                # rides on our next packet (a caller's next request).
                self._conn.flush_later()
        await self._conn.schedule_point()

    # -- closing --------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        # In a cancelled scope trio asks for a forceful close. Asked of the
        # task's cancel status (checkpoint_if_cancelled raises at once),
        # not of current_effective_deadline(), which walks every scope the
        # task is in: 2 Python calls instead of about 25 in an RPC caller
        # (bench/call_costs.py --python-calls).
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            self.close(forceful=True)
            raise
        self.close()
        await self._conn.schedule_point()

    def close(self, *, forceful: bool = False, code: int | None = None) -> None:
        """Close now, without waiting. Forceful (or with a ``code``): reset
        both directions with ``code`` (default ``cancel_code``)."""
        self._close(forceful, code, drop_input=False)

    def close_dropping_input(self) -> None:
        """Close gracefully, without asking the peer to stop sending: the
        rest of its input, up to its FIN, is read and dropped as it
        arrives, by the connection (no task waits for it).

        For a side that has said all it will and has no use for the rest,
        where waiting for the peer's FIN would cost a task's step (an RPC
        server that answered a call: the caller sends its FIN after the
        answer, as js-rpc's does, and would see a STOP_SENDING as an
        error). quiche keeps the stream until that FIN or a reset, and it
        counts against the peer's stream limit until then, so a peer that
        never finishes it only runs out of streams of its own.
        """
        self._close(False, None, drop_input=True)

    def _close(self, forceful: bool, code: int | None, *, drop_input: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._input_watcher = None
        conn = self._conn
        if not conn.closed:
            if code is not None:
                forceful = True
            # The peer's FIN read already: closing sends at most our own FIN,
            # and it and the ACK of the peer's FIN can wait for company (the
            # socket's deferred flush), as a lone FIN from send_eof does: a
            # server's next reply takes the ACK along, a caller's next
            # request the FIN, instead of a packet of their own (with
            # idle-point flushing, bench/call_costs.py: 4.12 -> 3.15
            # datagrams per unary call; tested against the flush at once in
            # test_a_finished_stream_closes_without_a_packet_of_its_own).
            # So can they when the rest of the input is dropped instead.
            quiet = (self._eof_received or drop_input) and not forceful
            code = self.cancel_code if code is None else code
            if not self._eof_received and self._recv_error is None:
                if not drop_input:
                    self._shutdown(Shutdown.READ, code if forceful else 0)
            else:
                drop_input = False  # the input is over: nothing to drop
            if (
                not self._fin_sent
                and self._send_error is None
                and not self._send_aborted
            ):
                if forceful:
                    self._shutdown(Shutdown.WRITE, code)
                else:
                    try:
                        self._conn.quiche.stream_send(self.stream_id, b"", True)
                    except QuicheError:
                        pass
                self._fin_sent = True
            if quiet:
                conn.flush_later()
            else:
                conn.flush()
        conn.forget_stream(self)
        if drop_input and not conn.closed:
            # Forgotten, the stream's later input is dropped as it comes
            # (_deliver_streams: an id the connection has seen); this drops
            # what is here already, the FIN perhaps.
            conn.discard_input(self.stream_id)
        self._receive_conflict.wake()
        self._send_conflict.wake()

    def reset(self, code: int) -> None:
        """Abort both directions with ``code`` (RESET_STREAM and
        STOP_SENDING) and close the stream."""
        self.close(forceful=True, code=code)

    def _shutdown(self, direction: Shutdown, code: int) -> None:
        try:
            self._conn.quiche.stream_shutdown(self.stream_id, direction, code)
        except QuicheError:
            pass  # already finished or never created: nothing to abort

    # -- internal interface: called by the connection ---------------------------

    def wake_receiver(self) -> bool:
        """quiche has data (or an error) to read on this stream; returns
        whether a task waiting to read was woken. With none waiting, the
        input watcher, if any, is told."""
        if self._receive_conflict.wake():
            return True
        if self._input_watcher is not None:
            self._tell_watcher()
        return False

    def wake_sender(self) -> None:
        """quiche may take more data on this stream."""
        self._send_conflict.wake()

    def connection_lost(self) -> None:
        """The connection ended: every waiter finds out (the input watcher
        too, when no task waits to read)."""
        self.wake_receiver()
        self._send_conflict.wake()

    def _tell_watcher(self) -> None:
        watcher = self._input_watcher
        assert watcher is not None
        try:
            watcher()
        except Exception:
            # Run from the socket's reader: a bug must not end it.
            self._input_watcher = None
            self._conn.report_bug(f"an input watcher of stream {self.stream_id}")
            self.close(forceful=True)
