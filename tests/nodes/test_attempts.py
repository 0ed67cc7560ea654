"""The attempt-deadline policy (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from polykey.nodes._attempts import (
    DEFAULT_ATTEMPT_TIMEOUT,
    MIN_ATTEMPT_TIMEOUT,
    AttemptTimer,
)


def test_default_before_any_dial_then_eight_dial_times() -> None:
    timer = AttemptTimer()
    assert timer.timeout() == DEFAULT_ATTEMPT_TIMEOUT
    assert timer.timeout(ceiling=1.0) == 1.0
    timer.note(0.1)
    assert timer.timeout() == 8 * 0.1
    timer.note(0.9)
    assert timer.smoothed == 0.1 + (0.9 - 0.1) / 8
    timer.note(0.0)
    assert timer.timeout() >= MIN_ATTEMPT_TIMEOUT


@given(st.lists(st.floats(0.0, 100.0), min_size=1), st.floats(0.01, 60.0))
def test_timeout_within_bounds(dials: list[float], ceiling: float) -> None:
    timer = AttemptTimer()
    for seconds in dials:
        timer.note(seconds)
    assert timer.smoothed is not None
    assert min(dials) <= timer.smoothed <= max(dials) + 1e-9
    assert timer.timeout(ceiling) <= ceiling
    assert timer.timeout(ceiling) >= min(ceiling, MIN_ATTEMPT_TIMEOUT)
