"""How long one attempt (a dial, a query) may take: what dials have taken.

Pure: the caller measures and reports dial times. Shared by
:class:`~polykey.nodes.NodeConnectionManager` and the simulated network in
:mod:`polykey.testing`, so simulated deadlines follow the real policy.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_ATTEMPT_TIMEOUT", "MIN_ATTEMPT_TIMEOUT", "AttemptTimer"]

#: Bounds of one attempt's deadline, and its multiple of the dial times seen.
MIN_ATTEMPT_TIMEOUT: Final = 0.5
DEFAULT_ATTEMPT_TIMEOUT: Final = 3.0
_ATTEMPT_RTTS: Final = 8
#: Weight of a new dial time in the smoothed one (as TCP's SRTT, 1/8).
_GAIN: Final = 1 / 8


class AttemptTimer:
    """Smoothed dial time, and the attempt deadline derived from it."""

    def __init__(self) -> None:
        #: Seconds, None before the first dial.
        self.smoothed: float | None = None

    def note(self, seconds: float) -> None:
        """A dial succeeded after ``seconds``."""
        if self.smoothed is None:
            self.smoothed = seconds
        else:
            self.smoothed += (seconds - self.smoothed) * _GAIN

    def timeout(self, ceiling: float = 15.0) -> float:
        """A multiple of the smoothed dial time, at least
        :data:`MIN_ATTEMPT_TIMEOUT`, at most ``ceiling``;
        :data:`DEFAULT_ATTEMPT_TIMEOUT` before the first dial."""
        if self.smoothed is None:
            return min(ceiling, DEFAULT_ATTEMPT_TIMEOUT)
        return min(ceiling, max(MIN_ATTEMPT_TIMEOUT, _ATTEMPT_RTTS * self.smoothed))
