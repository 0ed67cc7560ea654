"""Counting trio's work, for regression guards counted in events, not time."""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["SchedulerCounter"]


class SchedulerCounter(trio.abc.Instrument):
    """Counts task steps and scheduler rounds (waits for I/O) while entered.

    ``with SchedulerCounter() as counter: ...`` installs it as a trio
    instrument and removes it on the way out; :attr:`steps` and
    :attr:`rounds` hold what ran in between. Counts, unlike times, do not
    move with the machine's load.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.rounds = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.rounds += 1

    def __enter__(self) -> SchedulerCounter:
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        trio.lowlevel.remove_instrument(self)
