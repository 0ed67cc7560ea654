"""An in-memory bidirectional stream with FIN and reset-with-code.

The stand-in for a QUIC stream in tests and simulations: each direction is a
bounded byte buffer (``send_all`` waits while it is full, so flow control is
real), :meth:`MemoryStream.send_eof` is a FIN, and
:meth:`MemoryStream.reset` aborts both directions with an application code
the way RESET_STREAM + STOP_SENDING do: buffered data is discarded and the
peer's reads and writes raise :class:`~polykey.rpc.RPCStreamReset`.
``aclose`` is graceful for what was already sent (the peer reads it, then
EOF) and stops the receiving direction (the peer's writes then fail).
:meth:`MemoryStream.watch_input` calls back when input arrives that no task
waits to read, as QUIC streams do, from the writer's own call.

Passes :func:`trio.testing.check_half_closeable_stream`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import trio

from ._errors import RPCStreamReset

__all__ = ["DEFAULT_MEMORY_BUFFER", "MemoryStream", "memory_stream_pair"]

_log = logging.getLogger("polykey.rpc")

DEFAULT_MEMORY_BUFFER = 64 * 1024


def _receive_size(max_bytes: int | None) -> int | None:
    if max_bytes is not None:
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
    return max_bytes


class _Pipe:
    """One direction: bytes from a writer endpoint to a reader endpoint."""

    __slots__ = (
        "buf",
        "eof",
        "limit",
        "lot",
        "on_input",
        "reset_code",
        "stopped_code",
    )

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.eof = False
        # Set by the writer's reset: the reader sees RPCStreamReset.
        self.reset_code: int | None = None
        # Set when the reader stops (reset or close): the writer's sends fail.
        self.stopped_code: int | None = None
        self.lot = trio.lowlevel.ParkingLot()
        # The reader endpoint's, told of what the writer did (watch_input).
        self.on_input: Callable[[], None] | None = None

    def wake(self) -> None:
        self.lot.unpark_all()

    def arrived(self) -> None:
        """The writer sent data, its FIN or a reset, or closed."""
        self.lot.unpark_all()
        if self.on_input is not None:
            self.on_input()


class MemoryStream(trio.abc.HalfCloseableStream):
    """One endpoint of :func:`memory_stream_pair`.

    ``extra`` is free-form metadata (a simulator may put addresses there).
    """

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._closed = False
        self._sending = False
        self._receiving = False
        self._watcher: Callable[[], None] | None = None
        self.extra: dict[str, object] = {}

    # -- introspection -----------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reset_received(self) -> int | None:
        """The code the peer reset us with, if it did."""
        return self._in.reset_code

    @property
    def fin_received(self) -> bool:
        """The peer's FIN is here and every byte before it was read: the
        next ``receive_some`` returns ``b""`` at once (as QUIC streams say
        it: the RPC layer's ``EagerStream``)."""
        inc = self._in
        return inc.eof and not inc.buf and inc.reset_code is None and not self._closed

    @property
    def stop_received(self) -> int | None:
        """The code the peer stopped receiving with (0 for a plain close)."""
        return self._out.stopped_code

    # -- sending -------------------------------------------------------------
    def _check_send(self) -> None:
        if self._closed or self._out.eof:
            raise trio.ClosedResourceError("stream is closed for sending")
        if self._out.stopped_code is not None:
            code = self._out.stopped_code
            if code:
                raise RPCStreamReset(code, reset=False)
            raise trio.BrokenResourceError("peer closed the stream")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            self._check_send()
            view = memoryview(data).cast("B")
            while view:
                taken = self._queue(view)
                if not taken:
                    await self._out.lot.park()
                    self._check_send()
                    continue
                view = view[taken:]
        finally:
            self._sending = False

    def send_nowait(
        self, data: bytes | bytearray | memoryview, *, eof: bool = False
    ) -> int:
        """Buffer as much of ``data`` as there is room for, without waiting
        or a checkpoint; returns how much. ``eof``: the FIN follows if all of
        it fit (as QUIC streams offer it: the RPC layer's ``EagerStream``)."""
        view = memoryview(data).cast("B")
        if not view:
            raise ValueError("send_nowait needs data")
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._check_send()
        taken = self._queue(view)
        if eof and taken == len(view):
            self._out.eof = True
        return taken

    def _queue(self, view: memoryview) -> int:
        out = self._out
        room = out.limit - len(out.buf)
        if room <= 0:
            return 0
        out.buf += view[:room]
        out.arrived()
        return min(room, len(view))

    async def send_all_and_eof(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`send_all` then :meth:`send_eof`, as QUIC streams offer it
        (data and FIN in one packet), so in-memory tests take the RPC
        layer's QUIC path."""
        await self.send_all(data)
        await self.send_eof()

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_send()
                if len(self._out.buf) < self._out.limit:
                    return
                await self._out.lot.park()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if not self._out.eof:
            self._out.eof = True
            self._out.arrived()

    # -- receiving -------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = _receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                data = self._receive_ready(max_bytes)
                if data is not None:
                    return data
                await self._in.lot.park()
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int | None = None) -> bytes:
        """What :meth:`receive_some` returns when it need not wait, without
        its checkpoint; raises :exc:`trio.WouldBlock` when it would wait."""
        max_bytes = _receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        data = self._receive_ready(max_bytes)
        if data is None:
            raise trio.WouldBlock
        return data

    def watch_input(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` whenever the peer sends data, its FIN or a
        reset, or closes, while no task of ours is in :meth:`receive_some`
        (as QUIC streams call back, the RPC layer's ``InputWatcher``); it
        runs in the peer's call that did it, synchronously, reads with
        :meth:`receive_nowait` and must not block. ``None`` stops it; so
        does closing. A callback that raises is logged and the stream
        reset, code 0: the peer's call goes on."""
        if self._closed:
            return
        self._watcher = callback
        self._in.on_input = None if callback is None else self._input_arrived

    def _input_arrived(self) -> None:
        watcher = self._watcher
        if watcher is None or self._receiving:
            return  # a task reading is woken instead
        try:
            watcher()
        except Exception:
            _log.warning("a memory stream's input watcher failed", exc_info=True)
            self.reset(0)

    def _receive_ready(self, max_bytes: int | None) -> bytes | None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        inc = self._in
        if inc.reset_code is not None:
            raise RPCStreamReset(inc.reset_code)
        if inc.buf:
            n = len(inc.buf) if max_bytes is None else max_bytes
            data = bytes(inc.buf[:n])
            del inc.buf[:n]
            inc.wake()
            return data
        if inc.eof:
            return b""
        return None

    # -- closing -------------------------------------------------------------
    def reset(self, code: int) -> None:
        """Abort both directions with ``code`` (RESET_STREAM + STOP_SENDING)."""
        if self._closed:
            return
        self._closed = True
        if not self._out.eof or self._out.buf:
            # Data the peer has not read yet is abandoned, FIN or not.
            self._out.reset_code = code
            self._out.buf.clear()
        if self._in.stopped_code is None:
            self._in.stopped_code = code
        self._in.buf.clear()
        self._in.on_input = self._watcher = None
        self._out.arrived()
        self._in.wake()

    def close(self) -> None:
        """:meth:`aclose` without waiting (and without its checkpoint)."""
        if not self._closed:
            self._closed = True
            # Graceful for the sending half: what was sent is still read.
            self._out.eof = True
            if self._in.stopped_code is None:
                self._in.stopped_code = 0
            self._in.buf.clear()
            self._in.on_input = self._watcher = None
            self._out.arrived()
            self._in.wake()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def memory_stream_pair(
    max_buffer: int = DEFAULT_MEMORY_BUFFER,
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected :class:`MemoryStream` endpoints.

    Each direction buffers at most ``max_buffer`` bytes.
    """
    if max_buffer < 1:
        raise ValueError("max_buffer must be >= 1")
    a_to_b = _Pipe(max_buffer)
    b_to_a = _Pipe(max_buffer)
    return MemoryStream(a_to_b, b_to_a), MemoryStream(b_to_a, a_to_b)
