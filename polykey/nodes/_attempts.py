"""How long one attempt (a dial, a query, a ping) may take: what attempts
have taken, and how often the peer has just failed.

Pure: the caller measures and reports the times of attempts that succeeded.
Shared by :class:`~polykey.nodes.NodeConnectionManager` and the simulated
network in :mod:`polykey.testing`, so simulated deadlines follow the real
policy.

The estimate is TCP's retransmission timer (RFC 6298) applied to whole
attempts: a smoothed time (gain 1/8) and a smoothed mean deviation (gain
1/4); the deadline is the larger of eight smoothed times and the smoothed
time plus four deviations. The deviation term sets it only when times are
spread wider than their mean (one slow attempt among fast ones); what keeps
live peers from being taken for dead on a loaded host is the back-off,
which is per peer: each failure in a row doubles that peer's next deadline
(up to the ceiling), so a live peer that missed one deadline gets a longer
one before it is given up, while attempts to other peers keep the short
one (a dead peer must not make every attempt slow, which a global back-off
as TCP's would). Successful queries and pings are samples too, not only
dials: they are what the deadline bounds.

:class:`DialGate` is the other rule both connection pools follow: one
attempt to reach a node at a time, which callers arriving meanwhile wait
for and share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import trio

from ..keys import NodeId

__all__ = [
    "DEFAULT_ATTEMPT_TIMEOUT",
    "MIN_ATTEMPT_TIMEOUT",
    "AttemptTimer",
    "DialGate",
]

T = TypeVar("T")

#: Bounds of one attempt's deadline, and its multiple of the times seen.
MIN_ATTEMPT_TIMEOUT: Final = 0.5
DEFAULT_ATTEMPT_TIMEOUT: Final = 3.0
_ATTEMPT_RTTS: Final = 8
#: Weight of a new time in the smoothed one, and in the deviation (RFC 6298's
#: alpha and beta), and the deviation's multiple in the deadline (its K).
_GAIN: Final = 1 / 8
_DEVIATION_GAIN: Final = 1 / 4
_DEVIATIONS: Final = 4
#: Failures in a row past which the back-off grows no more (2**6 times the
#: base is past any ceiling in use).
_MAX_BACKOFF_FAILURES: Final = 6


class AttemptTimer:
    """Smoothed attempt time and deviation, and the deadline derived."""

    def __init__(self) -> None:
        #: Seconds, None before the first sample.
        self.smoothed: float | None = None
        #: Smoothed mean deviation of the samples, seconds.
        self.deviation = 0.0

    def note(self, seconds: float) -> None:
        """An attempt succeeded after ``seconds``."""
        seconds = max(0.0, seconds)
        if self.smoothed is None:
            self.smoothed = seconds
            self.deviation = seconds / 2
        else:
            # RFC 6298 2.3: the deviation from the old estimate, then the mean.
            self.deviation += (abs(self.smoothed - seconds) - self.deviation) * (
                _DEVIATION_GAIN
            )
            self.smoothed += (seconds - self.smoothed) * _GAIN

    def timeout(self, ceiling: float = 15.0, failures: int = 0) -> float:
        """The larger of eight smoothed times and the smoothed time plus
        four deviations, at least :data:`MIN_ATTEMPT_TIMEOUT`
        (:data:`DEFAULT_ATTEMPT_TIMEOUT` before the first sample), doubled
        for each of the peer's ``failures`` in a row; at most ``ceiling``."""
        if self.smoothed is None:
            base = DEFAULT_ATTEMPT_TIMEOUT
        else:
            base = max(
                MIN_ATTEMPT_TIMEOUT,
                _ATTEMPT_RTTS * self.smoothed,
                self.smoothed + _DEVIATIONS * self.deviation,
            )
        backoff: float = 2.0 ** min(max(failures, 0), _MAX_BACKOFF_FAILURES)
        return min(ceiling, base * backoff)


class DialGate:
    """At most one attempt to reach each node in flight.

    A caller takes its :meth:`turn`: while an attempt to the node is in
    flight it waits, then takes the connection that came of it (``pooled``).
    If there is none, it is its turn, and it makes its attempt inside
    :meth:`attempt`. When an attempt fails, every waiter wakes and the first
    to run tries again; the others wait for that one.
    """

    def __init__(self) -> None:
        self._in_flight: dict[NodeId, trio.Event] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._in_flight

    def __len__(self) -> int:
        """Attempts in flight."""
        return len(self._in_flight)

    async def turn(self, node_id: NodeId, pooled: Callable[[], T | None]) -> T | None:
        """The pooled connection to ``node_id`` (after any attempt in flight
        ends), or None: then the caller attempts, at once, before its next
        checkpoint."""
        while True:
            existing = pooled()
            if existing is not None:
                await trio.lowlevel.checkpoint()
                return existing
            pending = self._in_flight.get(node_id)
            if pending is None:
                # No checkpoint: the caller's attempt must be marked before
                # anyone else runs, or two would dial.
                return None
            await pending.wait()

    @contextlib.contextmanager
    def attempt(self, node_id: NodeId) -> Iterator[None]:
        """Within the block an attempt to ``node_id`` is in flight; a block
        inside another for the same node marks nothing (the outer one is
        the attempt waiters wait for)."""
        if node_id in self._in_flight:
            yield
            return
        done = self._in_flight[node_id] = trio.Event()
        try:
            yield
        finally:
            del self._in_flight[node_id]
            done.set()
