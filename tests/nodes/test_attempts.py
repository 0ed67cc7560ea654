"""The attempt-deadline policy (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from polykey.nodes import DEFAULT_ATTEMPT_TIMEOUT, MIN_ATTEMPT_TIMEOUT, AttemptTimer


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


def test_one_slow_attempt_among_fast_ones_is_covered_by_the_deviation() -> None:
    timer = AttemptTimer()
    for _ in range(20):
        timer.note(0.01)
    assert timer.timeout() == MIN_ATTEMPT_TIMEOUT
    # A loaded host: one attempt took 1 s. The next deadline covers one as
    # slow, and it is the deviation term that sets it, not 8 smoothed times.
    timer.note(1.0)
    assert timer.smoothed is not None
    assert timer.timeout() > 1.0
    assert timer.timeout() > 8 * timer.smoothed
    assert timer.timeout() == timer.smoothed + 4 * timer.deviation


@given(
    st.lists(st.floats(0.0, 100.0), max_size=20),
    st.floats(0.01, 60.0),
    st.integers(0, 100),
)
def test_backoff_doubles_per_failure_up_to_the_ceiling(
    samples: list[float], ceiling: float, failures: int
) -> None:
    timer = AttemptTimer()
    for seconds in samples:
        timer.note(seconds)
    base = timer.timeout(float("inf"))
    backed_off = timer.timeout(ceiling, failures)
    assert backed_off <= ceiling
    assert backed_off == min(ceiling, base * 2 ** min(failures, 6))
    assert timer.timeout(ceiling, failures + 1) >= backed_off
