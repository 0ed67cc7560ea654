"""When to refresh which bucket, and when to look up our own NodeId.

Pure bookkeeping for :class:`~polykey.nodes.NodeManager`'s timers. Each
bucket has a deadline ``interval`` (1 h) after its last refresh, with
jitter so that a network of nodes started together does not refresh in
lockstep: the delay is uniform in ``interval * (1 +- jitter / 2)`` (Polykey's
``refreshBucketsDelayJitter``). Any lookup whose target falls in a bucket
counts as a refresh of that bucket. The self-lookup has its own period
(45 s) with the same jitter rule.
"""

from __future__ import annotations

import math
import random

from ._graph import BUCKET_COUNT

__all__ = ["RefreshSchedule"]


class RefreshSchedule:
    """Deadlines on the caller's clock; ``None`` intervals disable a timer."""

    def __init__(
        self,
        *,
        bucket_interval: float | None = 3600.0,
        self_interval: float | None = 45.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (
            ("bucket_interval", bucket_interval),
            ("self_interval", self_interval),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None")
        if not 0 <= jitter < 2:
            raise ValueError("jitter must be in [0, 2)")
        self.bucket_interval = bucket_interval
        self.self_interval = self_interval
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._buckets = [math.inf] * BUCKET_COUNT
        self._self = math.inf

    def _delay(self, interval: float) -> float:
        return interval * (1 + (self._rng.random() - 0.5) * self.jitter)

    def start(self, now: float) -> None:
        """Arm every timer from ``now``."""
        for index in range(BUCKET_COUNT):
            self.bucket_refreshed(index, now)
        self.self_lookup_done(now)

    def bucket_refreshed(self, index: int, now: float) -> None:
        if self.bucket_interval is not None:
            self._buckets[index] = now + self._delay(self.bucket_interval)

    def self_lookup_done(self, now: float) -> None:
        if self.self_interval is not None:
            self._self = now + self._delay(self.self_interval)

    def bucket_deadline(self, index: int) -> float:
        return self._buckets[index]

    @property
    def self_deadline(self) -> float:
        return self._self

    def due_buckets(self, now: float) -> list[int]:
        """Buckets whose deadline has passed, farthest first."""
        return [i for i in range(BUCKET_COUNT - 1, -1, -1) if self._buckets[i] <= now]

    def self_due(self, now: float) -> bool:
        return self._self <= now

    def next_deadline(self) -> float:
        return min(self._self, min(self._buckets))
