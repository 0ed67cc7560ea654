"""The longest stall of the trio loop while 1,000 nodes enter the node
graph (SQLite, synchronous=FULL, in a temporary directory).

A heartbeat task sleeps 1 ms at a time and records the longest gap between
its wake-ups, while another task adds 1,000 nodes: in one burst (a batch of
contacts processed without a checkpoint between them), and one at a time
with a checkpoint after each (contacts trickling in from many
connections); and, for the floor, a burst into a graph without a file.
Run by hand: ``.venv/bin/python bench/graph_stall.py [--writer]``
(``--writer``: writes off the loop, as a running node does).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import trio

from polykey.keys import NodeId
from polykey.nodes import GraphWriter, NodeAddress, NodeGraph


class Heartbeat:
    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self, stop: trio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await trio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.001)
            last = now


def contacts(n: int, own: NodeId, rng: random.Random) -> list[NodeId]:
    # Spread over many buckets, as a real network's are.
    out = []
    for i in range(n):
        bucket = 255 - (i % 200)
        distance = (1 << bucket) | rng.getrandbits(bucket)
        out.append(NodeId.from_int(own.to_int() ^ distance))
    return out


async def one_run(mode: str, n: int, writer: bool) -> tuple[float, float]:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        own = NodeId(rng.randbytes(32))
        if mode == "burst, no disk":
            graph = NodeGraph(own)  # the adds' own CPU: the floor of a burst
        else:
            graph = NodeGraph.open(Path(tmp) / "nodes.sqlite3", own)
        beat = Heartbeat()
        stop = trio.Event()
        ids = contacts(n, own, rng)
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            graph_writer = GraphWriter(graph)
            if writer:
                await nursery.start(graph_writer.run)
            nursery.start_soon(beat.run, stop)
            await trio.sleep(0.01)
            for i, node_id in enumerate(ids):
                graph.add(
                    node_id, NodeAddress("10.0.0.1", 1000 + i % 60000), time.time()
                )
                if mode == "trickle":
                    await trio.lowlevel.checkpoint()
            await graph_writer.durable()
            elapsed = time.perf_counter() - started
            await trio.sleep(0.01)
            stop.set()
            nursery.cancel_scope.cancel()
        graph.close()
        return beat.longest, elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--writer", action="store_true", help="writes off the loop (the graph writer)"
    )
    args = parser.parse_args()
    print(
        f"{args.nodes} nodes into a SQLite graph; writes {'off the loop' if args.writer else 'on the loop'}"
    )
    print(
        "mode     | longest loop stall (ms), median [min, max] | time to durable (s), median"
    )
    for mode in ("burst, no disk", "burst", "trickle"):
        runs = sorted(
            [await one_run(mode, args.nodes, args.writer) for _ in range(args.repeat)]
        )
        stalls = sorted(r[0] * 1000 for r in runs)
        times = sorted(r[1] for r in runs)
        mid = len(runs) // 2
        print(
            f"{mode:8} | {stalls[mid]:8.1f} [{stalls[0]:.1f}, {stalls[-1]:.1f}] | {times[mid]:.2f}"
        )


if __name__ == "__main__":
    trio.run(main)
