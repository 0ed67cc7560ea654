"""What RPC needs from a transport stream.

One call is one bidirectional stream.  RPC needs a
:class:`trio.abc.HalfCloseableStream` (FIN in each direction is part of the
protocol) and, to cancel a call the way js-rpc does, a way to abort the
stream with an application code: QUIC's RESET_STREAM + STOP_SENDING.  That is
the optional :meth:`ResettableStream.reset`; streams without it (TCP, trio's
memory streams) are closed with :func:`trio.aclose_forcefully` instead and
the code is lost.

A transport reports a reset by the peer by raising
:class:`StreamResetError` (a :class:`trio.BrokenResourceError`) carrying the
code from ``receive_some`` or ``send_all``; any ``BrokenResourceError`` with
an integer ``code`` attribute is understood the same way.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

import trio

__all__ = [
    "RPCStream",
    "ResettableStream",
    "StreamResetError",
    "reset_code_of",
    "reset_stream",
]

RPCStream: TypeAlias = trio.abc.HalfCloseableStream
"""A stream RPC can run over; ``reset(code)`` is used when present."""


@runtime_checkable
class ResettableStream(Protocol):
    def reset(self, code: int) -> None:
        """Abort both directions at once with an application ``code``.

        Unread and unsent data is discarded; the peer's pending and later
        ``receive_some``/``send_all`` raise :class:`StreamResetError`; ours
        raise :class:`trio.ClosedResourceError`.  Never blocks; idempotent.
        """
        ...


class StreamResetError(trio.BrokenResourceError):
    """The peer reset the stream with an application error ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"stream reset by peer with code {code}")


def reset_code_of(exc: BaseException) -> int | None:
    """The peer's reset code carried by a transport error, if any."""
    code = getattr(exc, "code", None)
    if isinstance(exc, trio.BrokenResourceError) and isinstance(code, int):
        return code
    return None


async def reset_stream(stream: trio.abc.Stream, code: int) -> None:
    """Cancel ``stream`` with ``code`` if it can carry one, else close it."""
    if isinstance(stream, ResettableStream):
        stream.reset(code)
        # Release whatever the transport holds; after reset this is quick.
        await trio.aclose_forcefully(stream)
    else:
        await trio.aclose_forcefully(stream)
