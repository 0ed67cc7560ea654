"""Kademlia over simulated networks: joining, finding, dying, refreshing.

Deterministic: seeded ids, MockClock(autojump_threshold=0), virtual time.
"""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import trio
import trio.testing

from polykey.nodes import NodeManagerConfig
from polykey.nodes._manager import SELF_LOOKUP
from polykey.testing._network import SimNode, SimulatedNetwork

QUIET = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)


async def find_all(
    pairs: list[tuple[SimNode, SimNode]],
) -> tuple[int, list[int]]:
    found = 0
    rounds = []
    for source, target in pairs:
        result = await source.manager.lookup(target.node_id, find=True)
        if result.found is not None and result.found.node_id == target.node_id:
            found += 1
            assert result.found_round is not None
            rounds.append(result.found_round)
    return found, rounds


def sample_pairs(
    rng: random.Random, nodes: list[SimNode], n: int
) -> list[tuple[SimNode, SimNode]]:
    pairs: list[tuple[SimNode, SimNode]] = []
    while len(pairs) < n:
        a, b = rng.sample(nodes, 2)
        pairs.append((a, b))
    return pairs


async def test_rpc_network_every_node_finds_every_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The full stack: real handlers, codec and RPC client over memory streams."""
    async with SimulatedNetwork(config=QUIET, seed=7) as net:
        with trio.fail_after(3600):
            seed = await net.spawn()
            nodes = [seed] + [await net.spawn(join=[seed]) for _ in range(23)]
            pairs = [(a, b) for a in nodes for b in nodes if a is not b]
            found, _ = await find_all(random.Random(1).sample(pairs, 150))
        assert found == 150
        # Every reached node served one call, but a ping (a connection, as
        # a node pings) serves none.
        served = sum(n.server.statistics().calls for n in nodes if n.server)
        pings = sum(n.manager.statistics().pings for n in nodes)
        assert served + pings == net.stats.reached
        assert all(
            n.server.statistics().error_responses == 0 for n in nodes if n.server
        )


# The joins are ~140 queries each, every one through the handler and the
# message codec a node runs: about 270 s at load 4-6 (it was ~30 s when the
# direct transport skipped them); room for a busy machine.
@pytest.mark.timeout(900)
async def test_thousand_nodes_join_find_and_survive_30_percent_dying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(1000)
    async with SimulatedNetwork(config=QUIET, transport="direct", seed=1000) as net:
        with trio.fail_after(36_000):
            seed = await net.spawn()
            for _ in range(999):
                await net.spawn(join=[seed])
            nodes = list(net.nodes.values())
            found, rounds = await find_all(sample_pairs(rng, nodes, 300))
            assert found == 300
            assert statistics.quantiles(rounds, n=20)[-1] <= 3  # p95
            for node in rng.sample(nodes[1:], 300):
                net.kill(node)  # silent: attempts hang until their deadline
            live = net.live_nodes()
            found, rounds = await find_all(sample_pairs(rng, live, 300))
            assert found == 300
        sizes = [len(n.graph) for n in nodes]
        assert min(sizes) >= 20


async def test_refresh_timers_fire_on_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NodeManagerConfig(
        refresh_interval=600.0, self_lookup_interval=45.0, refresh_jitter=0.5
    )
    async with SimulatedNetwork(config=config, transport="direct", seed=3) as net:
        seed = await net.spawn()
        nodes = [seed] + [await net.spawn(join=[seed]) for _ in range(15)]
        start = trio.current_time()
        await trio.sleep(2400)
        for node in nodes:
            events = [e for e in node.manager.timer_events if e[0] > start]
            selfs = [t for t, b in events if b == SELF_LOOKUP]
            # Every 45 s +- 25% (jitter 0.5); lookups take no virtual time here.
            gaps = [b - a for a, b in itertools.pairwise(selfs)]
            assert len(selfs) >= 2400 / 56.25 - 1
            assert all(33.75 - 1e-6 <= g <= 56.25 + 1e-6 for g in gaps), gaps
            by_bucket: dict[int, list[float]] = {}
            for t, b in events:
                if b != SELF_LOOKUP:
                    by_bucket.setdefault(b, []).append(t)
            assert by_bucket, "no bucket was refreshed"
            closest = min(node.graph.nonempty_buckets())
            assert set(by_bucket) <= set(range(closest, 256))
            for times in by_bucket.values():
                assert len(times) >= 2400 / 750 - 1
                gaps = [b - a for a, b in itertools.pairwise(times)]
                assert all(450 - 1e-6 <= g <= 750 + 1e-6 for g in gaps), gaps
            assert node.manager.statistics().refreshes >= len(by_bucket)


async def test_a_lookup_goes_past_dead_closest_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When every one of the k nodes we know closest to a target is dead, the
    lookup goes on with the next ones we know (it has no other source), as
    long as its budget lasts: here 30 queries, k = 20."""
    config = NodeManagerConfig(
        refresh_interval=None,
        self_lookup_interval=None,
        max_contacted=30,
        query_timeout=1.0,  # a dead node costs 1 s, so the lookup's 60 s last
    )
    async with SimulatedNetwork(config=config, seed=21, transport="direct") as net:
        with trio.fail_after(3600):
            seed = await net.spawn()
            nodes = [await net.spawn(join=[seed]) for _ in range(40)]
            me = nodes[0]
            target = net.new_node_id()  # no node's id
            graph = me.manager.graph
            assert len(graph) > graph.k
            dead = {c.node_id for c in graph.closest(target, graph.k)}
            for node in [seed, *nodes]:
                if node.node_id in dead:
                    net.kill(node)
            result = await me.manager.lookup(target)
            assert result.contacts
            assert not dead & {c.node_id for c in result.contacts}
