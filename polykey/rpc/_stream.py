"""What RPC needs from a transport stream.

One call is one bidirectional stream.  RPC needs a
:class:`trio.abc.HalfCloseableStream` (FIN in each direction is part of the
protocol) and, to cancel a call the way js-rpc does, a way to abort the
stream with an application code: QUIC's RESET_STREAM + STOP_SENDING.  That is
the optional :meth:`ResettableStream.reset`; streams without it (TCP, trio's
memory streams) are closed with :func:`trio.aclose_forcefully` instead and
the code is lost.

A transport reports that the peer aborted the stream by raising a
:class:`trio.BrokenResourceError` that is also a :class:`StreamAbort`: it
carries the peer's application ``reset_code`` and whether the peer reset its
sending side (RESET_STREAM, seen by ``receive_some``) or asked us to stop
sending (STOP_SENDING, seen by ``send_all``). QUIC's ``QUICStreamError``
and our memory streams' :class:`~polykey.rpc.RPCStreamReset` are both; any
other ``BrokenResourceError`` is a stream that broke without a code.

A stream may also be an :class:`EagerStream`: it says when the peer's FIN
has been read along with the last data, closes without waiting, and reads
and writes what needs no waiting without a checkpoint. Then a call that has
its answer and the server's FIN ends without another read or a scheduling
round of its own, a client writes its request in the step that opened the
stream, and a server's call task reads its request and writes a unary
reply in its first step (see :func:`eager`); other streams do the same
through ``receive_some``, ``send_all`` and ``aclose``, a round each.

A stream may also be an :class:`InputDropper`: it can close while the peer
is still sending and drop the rest of the peer's input as it arrives, up to
its FIN, with no task waiting and without asking the peer to stop (QUIC's,
where quiche holds the stream until then). A server call that has answered
ends so instead of reading to the caller's FIN itself, up to ``linger``
(see :func:`dropper`).

A stream that is both an :class:`EagerStream` and an :class:`InputWatcher`
(QUIC's, :class:`~polykey.rpc.MemoryStream`) can call back when input
arrives that no task waits for. A server call whose handler waits is
watched so for the caller's FIN, a reset or input that breaks the
protocol, instead of by a reader task of its own (see :func:`watcher`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeAlias, runtime_checkable

import trio

__all__ = [
    "EagerStream",
    "InputDropper",
    "InputWatcher",
    "RPCStream",
    "ResettableStream",
    "StreamAbort",
    "abort_of",
    "dropper",
    "eager",
    "nowait_opener",
    "reset_stream",
    "watcher",
]

RPCStream: TypeAlias = trio.abc.HalfCloseableStream
"""A stream RPC can run over; ``reset(code)`` is used when present."""


@runtime_checkable
class ResettableStream(Protocol):
    def reset(self, code: int) -> None:
        """Abort both directions at once with an application ``code``.

        Unread and unsent data is discarded; the peer's pending and later
        ``receive_some``/``send_all`` raise an error that is a
        :class:`StreamAbort`; ours raise :class:`trio.ClosedResourceError`.
        Never blocks; idempotent.
        """
        ...


@runtime_checkable
class StreamAbort(Protocol):
    """What a transport's error says when the peer aborted the stream."""

    @property
    def reset_code(self) -> int:
        """The peer's application error code."""
        ...

    @property
    def reset(self) -> bool:
        """True: the peer reset its side (RESET_STREAM); False: it asked us
        to stop sending (STOP_SENDING)."""
        ...


@runtime_checkable
class EagerStream(Protocol):
    """A stream that tells when the peer's FIN has been read, closes without
    waiting, and reads and writes what needs no waiting without a checkpoint
    (QUIC's, :class:`~polykey.rpc.MemoryStream`).

    The ``_nowait`` methods are for a caller that has just passed a schedule
    point of its own or ends right after: trio's rule that every operation
    is a checkpoint then holds for the call as a whole.
    """

    @property
    def fin_received(self) -> bool:
        """The peer's FIN has been read with the data before it: the next
        ``receive_some`` returns ``b""`` without waiting."""
        ...

    def close(self) -> None:
        """``aclose()`` outside a cancelled scope, without its checkpoint:
        graceful (our FIN goes if it has not), never blocks, idempotent."""
        ...

    def receive_nowait(self, max_bytes: int | None = None) -> bytes:
        """``receive_some()`` when it need not wait, without its checkpoint;
        :exc:`trio.WouldBlock` when it would."""
        ...

    def send_nowait(
        self, data: bytes | bytearray | memoryview, *, eof: bool = False
    ) -> int:
        """Queue as much of ``data`` (not empty) as fits now, without waiting
        or a checkpoint; returns how much. ``eof``: the FIN goes with the
        last byte if all of it fit. The rest is the caller's to send."""
        ...


#: Whether a stream class is an EagerStream, asked once per class: the
#: protocol check walks its members, and unary calls ask it every call.
_eager_classes: dict[type, bool] = {}


def eager(stream: object) -> EagerStream | None:
    """``stream`` as an :class:`EagerStream`, or None if it is not one."""
    known = _eager_classes.get(type(stream))
    if known is None:
        known = _learn(_eager_classes, stream, EagerStream)
    return stream if known else None  # type: ignore[return-value]


def _learn(known: dict[type, bool], stream: object, protocol: type) -> bool:
    """Whether ``stream``'s class is a ``protocol``, remembered in ``known``
    (the protocol check walks its members; the hot path asks the dict)."""
    answer = known[type(stream)] = isinstance(stream, protocol)
    return answer


@runtime_checkable
class InputDropper(Protocol):
    """A stream that can close gracefully while the peer still sends."""

    def close_dropping_input(self) -> None:
        """Close as ``close()`` does, our FIN going if it has not, without
        asking the peer to stop sending: the rest of its input, up to its
        FIN, is read and dropped as it arrives, with no task waiting for it.
        Never blocks; idempotent."""
        ...


_dropper_classes: dict[type, bool] = {}


def dropper(stream: object) -> InputDropper | None:
    """``stream`` as an :class:`InputDropper`, or None if it is not one."""
    known = _dropper_classes.get(type(stream))
    if known is None:
        known = _learn(_dropper_classes, stream, InputDropper)
    return stream if known else None  # type: ignore[return-value]


@runtime_checkable
class InputWatcher(Protocol):
    """A stream that calls back when input arrives that no task waits for."""

    def watch_input(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()``, synchronously and from outside any task of
        the caller's, whenever input arrives (data, the peer's FIN or reset,
        the transport's end) while no task waits to read; ``None`` stops,
        and so does closing. It reads what is there without waiting and
        must not block; what was there before it was set is the caller's
        to read first."""
        ...


_watcher_classes: dict[type, bool] = {}


def watcher(stream: object) -> InputWatcher | None:
    """``stream`` as an :class:`InputWatcher` that is also an
    :class:`EagerStream` (its callback reads with ``receive_nowait``), or
    None if it is not both."""
    known = _watcher_classes.get(type(stream))
    if known is None:
        known = _watcher_classes[type(stream)] = (
            isinstance(stream, InputWatcher) and eager(stream) is not None
        )
    return stream if known else None  # type: ignore[return-value]


def nowait_opener(factory: object) -> Callable[[], RPCStream] | None:
    """How ``factory`` opens a stream without waiting, if it can: a bound
    ``open_stream`` method whose object also has ``open_stream_nowait``
    (a :class:`~polykey.quic.QUICConnection`'s), which raises
    :exc:`trio.WouldBlock` when it would wait. None otherwise."""
    if getattr(factory, "__name__", None) != "open_stream":
        return None
    owner = getattr(factory, "__self__", None)
    opener = getattr(owner, "open_stream_nowait", None)
    return opener if callable(opener) else None


def abort_of(exc: BaseException) -> StreamAbort | None:
    """The peer's abort carried by a transport error, if it is one."""
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc, StreamAbort):
        return exc
    return None


async def reset_stream(stream: trio.abc.Stream, code: int) -> None:
    """Cancel ``stream`` with ``code`` if it can carry one, else close it."""
    if isinstance(stream, ResettableStream):
        stream.reset(code)
        # Release whatever the transport holds; after reset this is quick.
        await trio.aclose_forcefully(stream)
    else:
        await trio.aclose_forcefully(stream)
