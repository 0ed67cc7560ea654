"""The byte stream of a raw call, after its JSON header."""

from __future__ import annotations

import trio

__all__ = ["RawStream"]


class RawStream(trio.abc.HalfCloseableStream):
    """The call's transport stream, replaying bytes read past the header first.

    Closing it closes the call's stream.
    """

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, leftover: bytes = b""
    ) -> None:
        self._stream = stream
        self._leftover = leftover

    @property
    def transport_stream(self) -> trio.abc.HalfCloseableStream:
        return self._stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._leftover:
            await trio.lowlevel.checkpoint()
            n = len(self._leftover) if max_bytes is None else max_bytes
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return bytes(data)
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._leftover = b""
        await self._stream.aclose()
