"""A connection's pure bookkeeping: stream ids, timer deadlines, close reasons.

No I/O and no trio here: :class:`~polykey.quic._connection.QUICConnection`
feeds these the numbers it reads from quiche and the clock, and acts on what
they answer. Each is unit-tested on its own (tests/quic/test_state.py).
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple, Protocol

from ._errors import CloseKind, CloseReason

__all__ = ["Deadlines", "Due", "StreamIds", "close_reason"]


class StreamIds:
    """Which stream ids a connection has used (RFC 9000 2.1).

    The two low bits of an id say who opened it (bit 0: the server) and
    whether it is unidirectional (bit 1); each kind counts up in steps of 4.
    """

    __slots__ = (
        "_gaps",
        "_local",
        "_next_bidi",
        "_next_uni",
        "_peer_bidi",
        "_peer_uni",
    )

    _gaps: set[int] | None

    def __init__(self, *, is_server: bool) -> None:
        self._local = int(is_server)
        self._next_bidi = self._local
        self._next_uni = self._local | 2
        # Highest peer id seen per kind, and the lower ids not seen yet:
        # together they tell a new peer stream from one we already closed.
        # The gaps stay within the peer's stream limit; the set is made when
        # the first gap is (every connection has a StreamIds, most never see
        # a gap). Two slots, not a list: 90 bytes less a connection.
        self._peer_bidi = -1
        self._peer_uni = -1
        self._gaps = None

    def open_local(self, *, unidirectional: bool) -> int:
        """The id of the next stream we open."""
        if unidirectional:
            sid, self._next_uni = self._next_uni, self._next_uni + 4
        else:
            sid, self._next_bidi = self._next_bidi, self._next_bidi + 4
        return sid

    def accept_peer(self, sid: int) -> bool:
        """Whether ``sid``, readable and not an open stream of ours, is a new
        stream of the peer's (now counted as seen). False: one of our own
        ids, or a peer stream that was already delivered (and closed since).
        """
        if (sid & 1) == self._local:
            return False
        uni = sid & 2
        highest = self._peer_uni if uni else self._peer_bidi
        if sid > highest:
            # Lower ids the peer opened implicitly come later, with their
            # first data; remember them until then.
            start = highest + 4 if highest >= 0 else sid & 3
            if start < sid:
                if self._gaps is None:
                    self._gaps = set()
                self._gaps.update(range(start, sid, 4))
            if uni:
                self._peer_uni = sid
            else:
                self._peer_bidi = sid
            return True
        gaps = self._gaps
        if gaps is not None and sid in gaps:
            gaps.discard(sid)
            return True
        return False


class Due(NamedTuple):
    """What a timer firing at some moment has to do (a tuple: built on
    every timer fire, cheaper than an ``enum.Flag``)."""

    #: The handshake timeout expired: close the connection (nothing else).
    handshake: bool = False
    #: quiche's own timeout (loss detection, idle, ack delay): on_timeout.
    quiche: bool = False
    #: Time for a keep-alive PING.
    keep_alive: bool = False


_NOTHING_DUE: Final = Due()
_HANDSHAKE_DUE: Final = Due(handshake=True)


class Deadlines:
    """A connection's one timer: the earliest of quiche's timeout, the next
    keep-alive and the handshake deadline (trio-clock seconds, inf: none).

    ``armed`` is the deadline the socket's timer task calls the connection
    at. Moving it costs more than the packet that moved it (a new entry in
    the socket's timer heap), so a later deadline does not move ``armed``:
    the connection is called at the earlier, finds nothing due, and
    re-arms. An earlier one, or one after ``armed`` passed, does.
    """

    __slots__ = ("armed", "handshake", "keep_alive", "quiche")

    def __init__(self) -> None:
        self.quiche = math.inf
        self.keep_alive = math.inf
        self.handshake = math.inf
        self.armed = math.inf

    def rearm(
        self, now: float, quiche_timeout: float | None, keep_alive: float | None
    ) -> bool:
        """Take quiche's new timeout (None: none) and, while ``keep_alive``
        (an interval) is given and no keep-alive is pending, schedule one.
        Returns whether ``armed`` moved."""
        self.quiche = math.inf if quiche_timeout is None else now + quiche_timeout
        if keep_alive and self.keep_alive == math.inf:
            self.keep_alive = now + keep_alive
        deadline = min(self.quiche, self.keep_alive, self.handshake)
        current = self.armed
        if deadline < current or current <= now:
            self.armed = deadline
            return True
        return False

    def due(self, now: float) -> Due:
        """What is due at ``now``; a keep-alive that is due is consumed (the
        next is scheduled by :meth:`rearm`). A handshake timeout is all
        there is to do."""
        if now >= self.handshake:
            return _HANDSHAKE_DUE
        quiche = now >= self.quiche
        keep_alive = now >= self.keep_alive
        if keep_alive:
            self.keep_alive = math.inf
        elif not quiche:
            return _NOTHING_DUE
        return Due(False, quiche, keep_alive)


class _ConnectionClose(Protocol):
    """A CONNECTION_CLOSE frame as quiche reports it."""

    @property
    def is_app(self) -> bool: ...
    @property
    def error_code(self) -> int: ...
    @property
    def reason(self) -> bytes: ...


def close_reason(
    *,
    verified: bool,
    timed_out: bool,
    peer: _ConnectionClose | None,
    local: _ConnectionClose | None,
) -> CloseReason:
    """How a connection that quiche closed by itself ended. Failures before
    the peer was ``verified`` count as the handshake's, except a peer's
    application close."""
    if timed_out:
        return CloseReason(CloseKind.IDLE_TIMEOUT if verified else CloseKind.HANDSHAKE)
    if peer is not None:
        kind = CloseKind.PEER if verified or peer.is_app else CloseKind.HANDSHAKE
        return CloseReason(kind, peer.is_app, peer.error_code, peer.reason)
    if local is not None:
        kind = CloseKind.PROTOCOL if verified else CloseKind.HANDSHAKE
        return CloseReason(kind, local.is_app, local.error_code, local.reason)
    return CloseReason(CloseKind.PROTOCOL)
