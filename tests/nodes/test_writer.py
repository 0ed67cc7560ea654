"""GraphWriter: node graph writes off the event loop, durable when it says."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import trio

from polykey.keys import NodeId
from polykey.nodes import GraphWriter, NodeAddress, NodeGraph, NodeGraphStoreError

from .helpers import id_in_bucket


def rows_on_disk(path: Path) -> set[bytes]:
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT node_id FROM nodes")}
    finally:
        db.close()


async def test_writes_leave_the_loop_and_are_durable_when_it_says(
    tmp_path: Path,
) -> None:
    rng = random.Random(3)
    own = NodeId(rng.randbytes(32))
    path = tmp_path / "nodes.sqlite3"
    graph = NodeGraph.open(path, own)
    writer = GraphWriter(graph)
    slow_writes = 0
    write = graph.write

    def slow(rows: list, deletes: list) -> None:  # type: ignore[type-arg]
        nonlocal slow_writes
        slow_writes += 1
        time.sleep(0.2)  # a slow disk, in the worker thread
        write(rows, deletes)

    graph.write = slow  # type: ignore[method-assign]
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            await trio.sleep(0.01)
            beats += 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            nursery.start_soon(heartbeat)
            ids = [id_in_bucket(own, 255 - i % 100, rng) for i in range(300)]
            for i, node_id in enumerate(ids):
                graph.add(node_id, NodeAddress("10.0.0.1", 1000 + i), 0.0)
            # In memory at once; on disk not yet (nothing was written inline).
            assert len(graph) == 300
            await writer.durable()
            assert rows_on_disk(path) == {n.raw for n in ids}
            # A burst of 300 went in a few transactions, not 300, and the
            # loop kept beating while they ran.
            assert 1 <= slow_writes <= 3
            assert beats >= 10
            graph.remove(ids[0])
            await writer.durable()
            assert ids[0].raw not in rows_on_disk(path)
            nursery.cancel_scope.cancel()
    graph.close()


async def test_a_failing_disk_is_reported_and_retried(tmp_path: Path) -> None:
    rng = random.Random(4)
    own = NodeId(rng.randbytes(32))
    path = tmp_path / "nodes.sqlite3"
    graph = NodeGraph.open(path, own)
    writer = GraphWriter(graph)
    write = graph.write
    failures = [NodeGraphStoreError(path, "disk full")]

    def flaky(rows: list, deletes: list) -> None:  # type: ignore[type-arg]
        if failures:
            raise failures.pop()
        write(rows, deletes)

    graph.write = flaky  # type: ignore[method-assign]
    first, second = (id_in_bucket(own, 200, rng), id_in_bucket(own, 201, rng))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            graph.add(first, NodeAddress("10.0.0.1", 1), 0.0)
            while writer.write_errors == 0:  # noqa: ASYNC110 - a counter
                await trio.sleep(0.01)
            assert first.raw not in rows_on_disk(path)
            # The node keeps going; the next change carries the failed one's
            # rows along.
            graph.add(second, NodeAddress("10.0.0.2", 2), 0.0)
            await writer.durable()
            assert {first.raw, second.raw} <= rows_on_disk(path)
            nursery.cancel_scope.cancel()
    graph.close()


ROOT = str(Path(__file__).resolve().parents[2])

CHILD = r"""
import random, sys, trio
from pathlib import Path
from polykey.keys import NodeId
from polykey.nodes import GraphWriter, NodeAddress, NodeGraph
sys.path.insert(0, sys.argv[3])
from tests.nodes.helpers import id_in_bucket

async def main(path, seed):
    rng = random.Random(seed)
    own = NodeId(bytes(32))
    graph = NodeGraph.open(Path(path), own)
    writer = GraphWriter(graph)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        print("ready", flush=True)
        added = []
        while True:
            node_id = id_in_bucket(own, rng.randrange(30, 256), rng)
            result = graph.add(node_id, NodeAddress("10.0.0.1", rng.randrange(1, 60000)), 0.0)
            if result.status != "full":
                added.append(node_id)
            if len(added) >= 7:
                await writer.durable()
                for n in added:  # acknowledged: on disk
                    print(n.encode(), flush=True)
                added.clear()
            # Evictions too: a graph that only grows proves less.
            if rng.random() < 0.1 and len(graph):
                victim = graph.closest(own, 1)[0].node_id
                graph.remove(victim)
                if victim in added:
                    added.remove(victim)  # never acknowledged, now gone
                print("-" + victim.encode(), flush=True)
            await trio.lowlevel.checkpoint()

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_acknowledged_nodes_survive_sigkill(tmp_path: Path) -> None:
    """A writer killed at random moments loses nothing it acknowledged."""
    root = ROOT
    rng = random.Random(5)
    path = tmp_path / "nodes.sqlite3"
    acknowledged: set[str] = set()
    with trio.fail_after(90):
        for seed in range(8):
            child = await trio.lowlevel.open_process(
                [sys.executable, "-c", CHILD, str(path), str(seed), root],
                stdout=subprocess.PIPE,
            )
            assert child.stdout is not None
            buffer = b""
            # The kill comes at a random moment of the writing, not of the
            # interpreter's start-up (slow on a loaded machine).
            while b"ready\n" not in buffer:
                chunk = await child.stdout.receive_some()
                assert chunk, "the writer exited before it was ready"
                buffer += chunk
            with trio.move_on_after(rng.uniform(0.3, 1.0)):
                while chunk := await child.stdout.receive_some():
                    buffer += chunk
            child.kill()
            await child.wait()
            # Only whole lines count; "-N" is a removal (acknowledged once a
            # later durable() returned, so not checked either way).
            for line in buffer.split(b"\n")[:-1]:
                text = line.decode()
                if text == "ready":
                    continue
                if text.startswith("-"):
                    acknowledged.discard(text[1:])
                else:
                    acknowledged.add(text)
            # Every restart opens the graph, with every acknowledged node.
            graph = NodeGraph.open(path, NodeId(bytes(32)))
            try:
                held = {
                    str(c.node_id) for c in graph.closest(NodeId(bytes(32)), 100_000)
                }
            finally:
                graph.close()
            assert acknowledged <= held, acknowledged - held
    assert len(acknowledged) >= 20
