"""GraphWriter: the node graph's SQLite writes, off the event loop.

A commit with ``synchronous=FULL`` waits for an fsync, milliseconds each; a
node adding many contacts at once stalled its event loop for seconds (1,000
adds: 2.95 s, measured by bench/graph_stall.py). The writer puts the graph in
deferred mode (:meth:`NodeGraph.defer_writes`): mutations update the graph
in memory and only mark what is pending; the writer wakes, takes everything
pending, and writes it in one transaction in a worker thread (one at a
time, so the SQLite connection is never used by two threads at once). While
a write runs, new changes queue up and go in the next one, so a burst costs
a few transactions, not one per node.

Durability is explicit: :meth:`GraphWriter.durable` returns once everything
changed before the call is on disk. ``NodeManager.add_node`` awaits it, so a
node whose addition was acknowledged survives a crash. Stopping the writer
writes what is left, on the way out.
"""

from __future__ import annotations

import logging

import trio

from ._errors import NodeGraphStoreError
from ._graph import NodeGraph

__all__ = ["GraphWriter"]

log = logging.getLogger("polykey.nodes.graph")


class GraphWriter:
    """``await nursery.start(writer.run)``; then ``await writer.durable()``."""

    def __init__(self, graph: NodeGraph) -> None:
        self.graph = graph
        self.written = graph.version
        self.writes = 0
        self.write_errors = 0
        self._wake = trio.Event()
        self._done = trio.lowlevel.ParkingLot()
        self._running = False

    def _poke(self) -> None:
        self._wake.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        graph = self.graph
        graph.defer_writes(self._poke)
        self._running = True
        limiter = trio.CapacityLimiter(1)
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                rows, deletes, version = graph.take_pending()
                try:
                    await trio.to_thread.run_sync(
                        graph.write,
                        rows,
                        deletes,
                        limiter=limiter,
                        abandon_on_cancel=False,
                    )
                except NodeGraphStoreError as exc:
                    # The disk refused (full, gone): say so, keep the node up,
                    # and keep the rows for the next write (the next change).
                    self.write_errors += 1
                    graph.restore_pending(rows, deletes)
                    log.warning("node graph write failed: %s", exc)
                    continue
                self.writes += 1
                self.written = version
                self._done.unpark_all()
        finally:
            self._running = False
            self._done.unpark_all()
            # Whatever is left goes to disk now, on this thread.
            graph.defer_writes(None)
            self.written = graph.version

    async def durable(self) -> None:
        """Return once every change made before the call is on disk."""
        target = self.graph.version
        while self._running and self.written < target:
            await self._done.park()
        await trio.lowlevel.checkpoint()
