"""JSON messages over one transport stream (the framing layer both sides use)."""

from __future__ import annotations

from typing import Any, Final

import trio

from ._codec import END, NEED_DATA, JSONStreamDecoder, encode_json
from ._stream import eager

__all__ = ["EOF", "MessageConn"]


class _EOFType:
    def __repr__(self) -> str:
        return "EOF"


#: :meth:`MessageConn.receive` after the peer's FIN.
EOF: Final = _EOFType()
_READ_SIZE: Final = 64 * 1024


class MessageConn:
    """Decodes JSON values from ``stream`` and encodes values onto it.

    At most one read (64 KiB) is buffered beyond the value being returned;
    bytes after a value are left undecoded until asked for, so a raw call
    can take them back as bytes (:meth:`take_leftover`).
    """

    __slots__ = ("_decoder", "_eager", "stream")

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, max_message_size: int
    ) -> None:
        self.stream = stream
        self._decoder = JSONStreamDecoder(max_message_size)
        self._eager = eager(stream)

    async def receive(self, *, eager: bool = False) -> Any:
        """The next value, or :data:`EOF` after the peer's FIN.

        ``eager``: the caller has just passed a schedule point (a call
        task's first step): bytes already here are read without another, if
        the stream is an :class:`~polykey.rpc.EagerStream`.
        """
        decoder = self._decoder
        read = False
        while True:
            value = decoder.next_value()
            if value is NEED_DATA:
                data: bytes | bytearray | None = None
                eager_stream = self._eager
                if eager and eager_stream is not None:
                    try:
                        data = eager_stream.receive_nowait(_READ_SIZE)
                    except trio.WouldBlock:
                        pass
                if data is None:
                    data = await self.stream.receive_some(_READ_SIZE)
                if data:
                    decoder.receive_data(data)
                    read = True
                else:
                    decoder.receive_eof()
                continue
            if value is END:
                return EOF
            # The value ends where the peer's FIN came (a reply and its FIN,
            # one packet): EOF is known now, without a read that would cost
            # a scheduling round of its own. Bytes left over (a truncated
            # value) are read on as before.
            eager_stream = self._eager
            if (
                read
                and eager_stream is not None
                and not decoder.buffered
                and eager_stream.fin_received
            ):
                decoder.receive_eof()
            return value

    def receive_nowait(self) -> Any:
        """The next value, or :data:`EOF`, from what an
        :class:`~polykey.rpc.EagerStream` holds now, without waiting or a
        checkpoint; :exc:`trio.WouldBlock` when it would need to wait (an
        input watcher's read: see :func:`~polykey.rpc._stream.watcher`)."""
        eager_stream = self._eager
        assert eager_stream is not None
        decoder = self._decoder
        while True:
            value = decoder.next_value()
            if value is NEED_DATA:
                data = eager_stream.receive_nowait(_READ_SIZE)
                if data:
                    decoder.receive_data(data)
                else:
                    decoder.receive_eof()
                continue
            return EOF if value is END else value

    @property
    def eof(self) -> bool:
        """True once the peer's FIN was read."""
        return self._decoder.eof

    async def send(
        self, value: Any, *, last: bool = False, eager: bool = False
    ) -> None:
        """Send ``value``; ``last`` sends the FIN after it, in the same packet
        when the stream can (QUIC's ``send_all_and_eof``).

        ``eager``: the caller has just passed a schedule point (it opened the
        stream) or ends right after (a unary reply): what the stream takes
        now goes without another, if it is an
        :class:`~polykey.rpc.EagerStream`; the rest, if any, as without.
        """
        await self.send_encoded(encode_json(value), last=last, eager=eager)

    async def send_encoded(
        self, data: bytes, *, last: bool = False, eager: bool = False
    ) -> None:
        """:meth:`send` of a value already encoded: the server encodes first,
        so a value that cannot be encoded fails before any byte is written."""
        eager_stream = self._eager
        if eager and eager_stream is not None and data:
            taken = eager_stream.send_nowait(data, eof=last)
            if taken == len(data):
                return
            data = data[taken:]
        if not last:
            await self.stream.send_all(data)
            return
        send_all_and_eof = getattr(self.stream, "send_all_and_eof", None)
        if send_all_and_eof is not None:
            await send_all_and_eof(data)
        else:
            await self.stream.send_all(data)
            await self.stream.send_eof()

    def take_leftover(self) -> bytes:
        """Bytes received past the last value (switching to raw mode)."""
        return self._decoder.take_buffer()
