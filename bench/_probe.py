"""Runs a benchmark peer under a probe of its wake-ups (for bench/critical_path.py).

    python bench/_probe.py OUT.json _rpc_polykey.py server
    python bench/_probe.py --check

A *wake-up* starts when trio's I/O poll returns after waiting (the process
slept until a datagram came) and ends at the next poll that waits. For each
wake-up that sent a datagram, the probe notes how long after the poll's
return each *mark* first happened: a task's first step (by task name), a
poll that did not wait (trio's round between two batches of task steps),
the sends (``sendto``, ``sendmsg``: when they start and when they
return) and the first call of each function in
:data:`MARKS`. At exit it writes each mark's samples to ``OUT.json``.

A mark costs about a microsecond (a Python wrapper): the figures say in
what order a wake-up does its work and about how long each part takes, not
exactly how fast it goes. ``--check`` only resolves :data:`MARKS` (exit 1
if one is gone), so a rename in polykey shows up in its test.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import runpy
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

#: Functions whose first call in a wake-up is marked: (package, Class.method
#: or function), public classes only (some of these methods are the layers'
#: internal interfaces, docs/quic.md lists them).
MARKS: tuple[tuple[str, str], ...] = (
    ("polykey.quic", "QUICConnection.datagram_received"),
    ("polykey.quic", "QUICConnection.after_input"),
    ("polykey.quic", "QUICConnection.flush"),
    ("polykey.quic", "QUICStream.receive_some"),
    ("polykey.quic", "QUICStream.receive_nowait"),
    ("polykey.quic", "QUICStream.send_nowait"),
    ("polykey.quic", "QUICStream.close"),
    ("polykey.rpc", "RPCServer.handle_stream_nowait"),
    ("polykey.rpc", "JSONStreamDecoder.next_value"),
    ("polykey.rpc", "RPCClient.unary"),
    # The socket's reader is done with what it read and waits again.
    ("trio.lowlevel", "wait_readable"),
)

#: The socket calls marked: the sends (reads are recvmmsg calls in C).
_SOCKET_CALLS = ("sendto", "sendmsg")


def _resolve(module: str, path: str) -> tuple[Any, str]:
    """The object holding the marked function, and its attribute name."""
    owner: Any = importlib.import_module(module)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    getattr(owner, name)  # AttributeError if it is gone
    return owner, name


class _Probe:
    def __init__(self) -> None:
        self.now = time.perf_counter
        self.woke: float | None = None
        self.marks: dict[str, float] = {}
        self.samples: dict[str, list[float]] = {}
        self.wakeups = 0

    def mark(self, name: str) -> None:
        if self.woke is not None and name not in self.marks:
            self.marks[name] = self.now() - self.woke

    # trio.abc.Instrument's hooks (duck-typed: trio is imported by the peer)
    def before_io_wait(self, timeout: float) -> None:
        if timeout == 0:
            self.mark("trio poll, not waiting")
            return
        self.mark("trio poll that waits (end of wake-up)")
        if self.woke is not None and any(k.startswith("send") for k in self.marks):
            self.wakeups += 1
            for key, value in self.marks.items():
                self.samples.setdefault(key, []).append(value)
        self.marks.clear()
        self.woke = None

    def after_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.woke = self.now()

    def before_task_step(self, task: Any) -> None:
        self.mark("task step: " + task.name.rsplit(".", 1)[-1])

    # -- wrappers ------------------------------------------------------------
    def wrap_socket_call(self, name: str) -> None:
        original = getattr(socket.socket, name)
        start, done = f"{name} called", f"{name} returned"
        mark = self.mark

        def marked(sock: socket.socket, *args: Any) -> Any:
            mark(start)
            try:
                return original(sock, *args)
            finally:
                mark(done)

        setattr(socket.socket, name, marked)

    def wrap_function(self, owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        mark = self.mark
        wrapped: Callable[..., Any]
        if inspect.iscoroutinefunction(original):

            async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
                mark(label)
                return await original(*args, **kwargs)

            wrapped = wrapped_async
        else:

            def wrapped_sync(*args: Any, **kwargs: Any) -> Any:
                mark(label)
                return original(*args, **kwargs)

            wrapped = wrapped_sync
        setattr(owner, name, functools.wraps(original)(wrapped))


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        missing = []
        for module, path in MARKS:
            try:
                _resolve(module, path)
            except (ImportError, AttributeError):
                missing.append(f"{module}:{path}")
        if missing:
            sys.exit("gone from polykey: " + ", ".join(missing))
        return
    out, script, *args = sys.argv[1:]
    probe = _Probe()
    for name in _SOCKET_CALLS:
        probe.wrap_socket_call(name)
    for module, path in MARKS:
        owner, name = _resolve(module, path)
        probe.wrap_function(owner, name, path)
    import trio

    run = trio.run

    def probed_run(*a: Any, **kw: Any) -> Any:
        kw["instruments"] = [*kw.get("instruments", ()), probe]
        return run(*a, **kw)

    trio.run = probed_run  # type: ignore[assignment]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as f:
            json.dump({"wakeups": probe.wakeups, "samples": probe.samples}, f)


if __name__ == "__main__":
    main()
