"""When to send the next packet of a hole punch.

Both sides of a punch send from the moment they learn the other's address
(the initiator re-sends its first Initial, the target sends small noise
packets), so whichever NAT opens last lets the next packet through. The gap
between packets bounds how long a punch waits after the last NAT opened:
short and jittered at first (10-50 ms, within DCUtR's 10-200 ms, so that a
punch between cone NATs completes about one round trip after the signal),
then backing off to at most a second, so a punch that cannot work costs
little.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Final

__all__ = ["BURST", "spray_delays"]

#: How long the fast phase lasts, in seconds.
BURST: Final = 1.0
_FAST: Final = (0.010, 0.050)
_SLOW_START: Final = 0.1
_SLOW_MAX: Final = 1.0


def spray_delays(rng: random.Random | None = None) -> Iterator[float]:
    """Delays (seconds) before each next packet, without end."""
    rng = rng or random.Random()
    elapsed = 0.0
    while elapsed < BURST:
        delay = rng.uniform(*_FAST)
        elapsed += delay
        yield delay
    slow = _SLOW_START
    while True:
        yield slow * rng.uniform(0.75, 1.25)
        slow = min(slow * 2, _SLOW_MAX)
