"""Counting trio's work, for regression guards counted in events, not time."""

from __future__ import annotations

import sys
from types import FrameType, TracebackType
from typing import Any

import trio

__all__ = ["PythonCallCounter", "SchedulerCounter"]


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


class PythonCallCounter:
    """Counts Python function calls in this thread while entered (each
    resumption of a coroutine counts as one: it runs a frame again).

    ``with PythonCallCounter() as counter: ...``; :attr:`calls` holds the
    count. Functions in C are not counted. The count is the work the
    interpreter did, stable from run to run where a time is not; the
    profile hook slows what it counts, so time nothing inside it.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._saved: Any = None

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            self.calls += 1

    def __enter__(self) -> PythonCallCounter:
        self._saved = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sys.setprofile(self._saved)
