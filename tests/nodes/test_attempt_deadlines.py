"""The node manager's attempt deadlines: from the times attempts took, and
backed off per peer, so a slow live node is not taken for a dead one."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from polykey.keys import NodeId
from polykey.nodes import (
    AttemptTimer,
    NodeAddress,
    NodeContact,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
)

from .helpers import addr, id_in_bucket

QUIET = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)
OWN = NodeId.from_int(1 << 200)


def fast_network() -> AttemptTimer:
    """A timer that has seen one 10 ms dial: deadlines at the 0.5 s floor."""
    timer = AttemptTimer()
    timer.note(0.01)
    return timer


class SlowTransport:
    """Answers every ping and query after ``delay[node]`` seconds (None:
    never, a dead node)."""

    def __init__(self, delay: dict[NodeId, float | None]) -> None:
        self.delay = delay
        self.pings: list[NodeId] = []

    async def _wait(self, node_id: NodeId) -> None:
        delay = self.delay.get(node_id, 0.01)
        if delay is None:
            await trio.sleep_forever()
        else:
            await trio.sleep(delay)

    async def ping(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> bool:
        self.pings.append(node_id)
        await self._wait(node_id)
        return True

    async def closest_nodes(
        self, node_id: NodeId, addresses: Sequence[NodeAddress], target: NodeId
    ) -> Sequence[NodeContact]:
        await self._wait(node_id)
        return []

    async def dial_back(self, node_id: NodeId, address: NodeAddress) -> bool:
        await self._wait(node_id)
        return True


async def test_a_slow_live_member_is_not_evicted_a_dead_one_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(7)
    graph = NodeGraph(OWN, k=2)
    slow, dead, newcomer = (id_in_bucket(OWN, 150, rng) for _ in range(3))
    graph.add(slow, addr(1), 0.0)
    graph.add(dead, addr(2), 0.0)
    # The slow member answers after 0.8 s: past the 0.5 s deadline, within
    # the doubled one. Before the back-off it was evicted as if dead.
    transport = SlowTransport({slow: 0.8, dead: None})
    timer = fast_network()
    manager = NodeManager(
        graph, transport, config=QUIET, clock=trio.current_time, attempts=timer
    )
    assert manager.attempt_deadline(slow) == 0.5
    await trio.sleep(120)  # past fresh_interval: members are due a ping
    with trio.fail_after(60):
        assert await manager.add_node(newcomer, addr(3))
    assert slow in graph
    assert dead not in graph
    assert newcomer in graph
    assert transport.pings.count(dead) == 2
    assert transport.pings.count(slow) == 2
    assert manager.statistics().evictions == 1
    # The slow member's answer was the one sample: deadlines follow it.
    assert timer.smoothed == pytest.approx(0.01 + (0.8 - 0.01) / 8)


async def test_each_failure_doubles_that_peers_deadline_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(8)
    graph = NodeGraph(OWN)
    dead, live = id_in_bucket(OWN, 150, rng), id_in_bucket(OWN, 160, rng)
    graph.add(dead, addr(1), 0.0)
    graph.add(live, addr(2), 0.0)
    manager = NodeManager(
        graph,
        SlowTransport({dead: None}),
        config=QUIET,
        clock=trio.current_time,
        attempts=fast_network(),
    )
    took = []
    with trio.fail_after(60):
        for _ in range(3):
            start = trio.current_time()
            assert not await manager.ping(dead)
            took.append(trio.current_time() - start)
    # 0.5 s, then 1 s, then 2 s; then it left the graph (max_failures 3).
    assert took == [pytest.approx(0.5), pytest.approx(1.0), pytest.approx(2.0)]
    assert dead not in graph
    assert manager.attempt_deadline(live) == 0.5


async def test_query_times_feed_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A loaded network's answers, slower and spread, lengthen every
    attempt's deadline within a few samples, not only after 8 dial times."""
    rng = random.Random(9)
    graph = NodeGraph(OWN)
    peers = [id_in_bucket(OWN, 150 + i, rng) for i in range(6)]
    for i, peer in enumerate(peers):
        graph.add(peer, addr(i + 1), 0.0)
    delays: dict[NodeId, float | None] = {
        p: d for p, d in zip(peers, [0.05, 0.3, 0.05, 0.4, 0.1, 0.35], strict=True)
    }
    manager = NodeManager(
        graph,
        SlowTransport(delays),
        config=QUIET,
        clock=trio.current_time,
        attempts=fast_network(),
    )
    before = manager.attempt_deadline()
    with trio.fail_after(60):
        for peer in peers:
            assert await manager.ping(peer)
    after = manager.attempt_deadline()
    assert before == 0.5
    # Smoothed time 0.1 s with a deviation of about 0.15 s: 8 x 0.1 s alone
    # would be 0.8 s; the deviation term makes it past 0.8 s.
    assert after > 0.8


async def test_a_find_asks_its_slow_target_once_more_backed_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One late answer (a loaded target) must not lose a find: the target's
    first timeout earns one more ask at twice the deadline. A dead target
    costs those two deadlines and no more; one already failing, only its
    backed-off one."""
    rng = random.Random(10)

    def alone_with(target: NodeId, delay: float | None) -> NodeManager:
        graph = NodeGraph(OWN)
        graph.add(target, addr(1), 0.0)
        return NodeManager(
            graph,
            SlowTransport({target: delay}),
            config=QUIET,
            clock=trio.current_time,
            attempts=fast_network(),
        )

    slow, dead, failing = (id_in_bucket(OWN, 150 + i, rng) for i in range(3))
    with trio.fail_after(60):
        manager = alone_with(slow, 0.8)
        start = trio.current_time()
        found = await manager.find(slow)
        assert found.found is not None
        assert found.found.node_id == slow
        assert (found.queries, found.failures) == (2, 1)
        # The first ask ended at 0.5 s, the second was answered 0.8 s later.
        assert trio.current_time() - start == pytest.approx(0.5 + 0.8)
        assert manager.graph.failures(slow) == 0

        manager = alone_with(dead, None)
        start = trio.current_time()
        missed = await manager.find(dead)
        assert missed.found is None
        assert (missed.queries, missed.failures) == (2, 2)
        assert trio.current_time() - start == pytest.approx(0.5 + 1.0)
        assert manager.graph.failures(dead) == 2

        manager = alone_with(failing, None)
        manager.note_unreachable(failing)
        start = trio.current_time()
        missed = await manager.find(failing)
        assert missed.found is None
        assert (missed.queries, missed.failures) == (1, 1)
        assert trio.current_time() - start == pytest.approx(1.0)


async def test_failures_of_overlapping_attempts_count_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three lookups asking one node at once and timing out together (a
    stall of ours, a burst of loss) are one failure, not the three in a row
    that remove it; three tries one after another are three."""
    rng = random.Random(11)
    node = id_in_bucket(OWN, 150, rng)
    graph = NodeGraph(OWN)
    graph.add(node, addr(1), 0.0)
    manager = NodeManager(
        graph,
        SlowTransport({node: None}),
        config=QUIET,
        clock=trio.current_time,
        attempts=fast_network(),
    )
    assert manager.config.max_failures == 3
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(manager.lookup, id_in_bucket(OWN, 100, rng))
        assert manager.statistics().query_failures == 3
        assert graph.failures(node) == 1
        assert node in graph
        assert not await manager.ping(node)
        assert graph.failures(node) == 2
        assert not await manager.ping(node)
        assert node not in graph
        assert manager.statistics().removed_failing == 1
