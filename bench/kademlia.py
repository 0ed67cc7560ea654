"""Kademlia lookups over 10,000 simulated nodes (polykey.testing's network).

Builds a network where every node joins through one seed (Kademlia's join:
ping the seed, look up our own NodeId, refresh every bucket farther than the
closest neighbour), then measures lookups from random nodes:

* find: look up an existing node's NodeId; success = that node answered.
  ``rounds`` = hops on the longest query chain, the last hop being the
  target itself; ``learned`` = hops until the target's address was known.
* closest: look up a random NodeId; success = the closest live node is
  the first result.

Then kills 30 % of the nodes (silently: attempts hang until their 15 s
deadline) and measures again, for live targets from live nodes. Time is
virtual (MockClock), so "lookups/s" is simulator throughput (CPU), not
network speed. The transport is the simulator's direct-call one: the RPC
codec over memory streams costs ~2-3 ms per query, too slow for 10,000
nodes (see docs/nodes.md).

    .venv/bin/python bench/kademlia.py [--nodes 10000] [--lookups 1000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import trio
import trio.testing

from polykey.keys import NodeId
from polykey.nodes import NodeManagerConfig
from polykey.testing import SimNode, SimulatedNetwork


def p95(values: list[int]) -> float:
    if len(values) < 2:
        return float(values[0]) if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


async def measure(
    net: SimulatedNetwork, rng: random.Random, lookups: int, label: str
) -> list[str]:
    live = net.live_nodes()
    live_ids = sorted(n.node_id.to_int() for n in live)
    rows = []
    # find mode
    ok = 0
    rounds: list[int] = []
    learned: list[int] = []
    rpcs: list[int] = []
    start = time.perf_counter()
    for _ in range(lookups):
        source, target = rng.sample(live, 2)
        result = await source.manager.lookup(target.node_id, find=True)
        rpcs.append(result.queries)
        if result.found is not None and result.found.node_id == target.node_id:
            ok += 1
            rounds.append(result.found_round or 0)
            learned.append(result.learned_round or 0)
    elapsed = time.perf_counter() - start
    rows.append(
        f"| {label} | find | {100 * ok / lookups:6.2f}% | {statistics.mean(rounds):.2f} | "
        f"{p95(rounds):.0f} | {statistics.mean(learned):.2f} | {p95(learned):.0f} | "
        f"{statistics.mean(rpcs):.1f} | {p95(rpcs):.0f} | {lookups / elapsed:,.0f} |"
    )
    # closest mode
    ok = 0
    rounds = []
    rpcs = []
    start = time.perf_counter()
    for _ in range(lookups):
        source: SimNode = rng.choice(live)
        target_id = NodeId(rng.randbytes(32))
        t = target_id.to_int()
        result = await source.manager.lookup(target_id)
        rpcs.append(result.queries)
        rounds.append(result.rounds)
        truth = min(
            (i for i in live_ids if i != source.node_id.to_int()), key=lambda i: i ^ t
        )
        if result.contacts and result.contacts[0].node_id.to_int() == truth:
            ok += 1
    elapsed = time.perf_counter() - start
    rows.append(
        f"| {label} | closest | {100 * ok / lookups:6.2f}% | {statistics.mean(rounds):.2f} | "
        f"{p95(rounds):.0f} | - | - | {statistics.mean(rpcs):.1f} | {p95(rpcs):.0f} | "
        f"{lookups / elapsed:,.0f} |"
    )
    return rows


async def main(args: argparse.Namespace) -> None:
    config = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)
    rng = random.Random(args.seed)
    async with SimulatedNetwork(
        config=config, transport="direct", seed=args.seed
    ) as net:
        start = time.perf_counter()
        seed = await net.spawn()
        for i in range(args.nodes - 1):
            await net.spawn(join=[seed])
            if args.progress and (i + 1) % 1000 == 0:
                print(
                    f"  {i + 1} joined, {time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                )
        built = time.perf_counter() - start
        sizes = [len(n.graph) for n in net.nodes.values()]
        joins = (net.stats.attempts) / args.nodes
        rows = await measure(net, rng, args.lookups, "all alive")
        dead = rng.sample(list(net.nodes.values())[1:], int(args.nodes * args.dead))
        for node in dead:
            net.kill(node)
        rows += await measure(net, rng, args.lookups, f"{args.dead:.0%} dead")
    print(
        f"Kademlia simulation: {args.nodes:,} nodes, k=20, alpha=3, at most 20 contacted, "
        f"{args.lookups:,} lookups per row (seed {args.seed})"
    )
    print(
        f"network built in {built:.0f} s ({args.nodes / built:,.0f} joins/s, "
        f"{joins:.0f} RPCs per join); graph size mean {statistics.mean(sizes):.0f}, "
        f"min {min(sizes)}"
    )
    print()
    print(
        "| network | lookup | success | rounds mean | rounds p95 | learned mean | "
        "learned p95 | RPCs mean | RPCs p95 | lookups/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--dead", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    trio.run(
        main, parser.parse_args(), clock=trio.testing.MockClock(autojump_threshold=0)
    )
