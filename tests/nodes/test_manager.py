"""NodeManager on a small simulated network, under trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from polykey.nodes import (
    NodeManagerConfig,
    NodeNotFoundError,
    OwnNodeIdError,
)
from polykey.testing._network import SimNode, SimulatedNetwork

from .helpers import id_in_bucket

QUIET = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)


async def test_ping_records_life_and_death(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET) as net:
        a, b, c = await net.spawn(), await net.spawn(), await net.spawn()
        with trio.fail_after(300):
            assert await a.manager.ping(b.node_id, [b.address])
            assert b.node_id in a.graph
            assert a.node_id in b.graph
            a.graph.add(c.node_id, c.address, 0.0)
            net.kill(c)
            start = trio.current_time()
            assert not await a.manager.ping(c.node_id)
            # A silent node costs one attempt timeout (15 s, virtual).
            assert trio.current_time() - start == pytest.approx(15.0)
            assert a.graph.failures(c.node_id) == 1
            assert not await a.manager.ping(c.node_id)
            assert not await a.manager.ping(c.node_id)
            assert c.node_id not in a.graph  # max_failures = 3
            assert not await a.manager.ping(c.node_id)  # no address known
            with pytest.raises(OwnNodeIdError):
                await a.manager.ping(a.node_id)
        stats = a.manager.statistics()
        assert stats.pings == 4
        assert stats.ping_failures == 3
        assert stats.removed_failing == 1


async def fill_bucket(
    net: SimulatedNetwork, owner: SimNode, index: int, count: int
) -> list[SimNode]:
    nodes = []
    rng = net.rng
    for _ in range(count):
        node = await net.spawn(id_in_bucket(owner.node_id, index, rng))
        nodes.append(node)
    return nodes


ALWAYS_PING = NodeManagerConfig(
    refresh_interval=None, self_lookup_interval=None, fresh_interval=0
)


async def test_full_bucket_evicts_the_dead_and_keeps_the_living(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Polykey's rule: ping the 3 least recently seen, evict the dead."""
    async with SimulatedNetwork(config=ALWAYS_PING, k=4) as net:
        owner = await net.spawn()
        members = await fill_bucket(net, owner, 200, 4)
        for m in members:
            owner.manager.note_contact(m.node_id, m.address)
        assert [c.node_id for c in owner.graph.bucket(200)] == [
            m.node_id for m in members
        ]
        extra = await fill_bucket(net, owner, 200, 3)
        with trio.fail_after(300):
            # All alive: the newcomer is dropped, the pinged members refreshed.
            owner.manager.note_contact(extra[0].node_id, extra[0].address)
            await wait_idle(owner)
            assert extra[0].node_id not in owner.graph
            assert [c.node_id for c in owner.graph.bucket(200)] == [
                members[3].node_id,
                members[0].node_id,
                members[1].node_id,
                members[2].node_id,
            ]
            # Two members die: the next newcomers take their places.
            net.kill(members[3])
            net.kill(members[0], mode="refuse")
            owner.manager.note_contact(extra[1].node_id, extra[1].address)
            owner.manager.note_contact(extra[2].node_id, extra[2].address)
            await wait_idle(owner)
        bucket = [c.node_id for c in owner.graph.bucket(200)]
        assert members[3].node_id not in bucket
        assert members[0].node_id not in bucket
        assert extra[1].node_id in bucket
        assert extra[2].node_id in bucket
        assert len(bucket) == 4
        stats = owner.manager.statistics()
        assert stats.evictions == 2
        assert stats.newcomers_dropped == 1
        # add_node does the same, synchronously
        net.kill(members[1])
        extra2 = await fill_bucket(net, owner, 200, 1)
        with trio.fail_after(300):
            assert await owner.manager.add_node(extra2[0].node_id, extra2[0].address)


async def wait_idle(node: SimNode) -> None:
    """Let the eviction worker finish: its pings end within their 15 s timeout."""
    await trio.sleep(60)
    assert node.manager.statistics().pending == 0


async def test_fresh_members_are_not_pinged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET, k=2) as net:
        owner = await net.spawn()
        members = await fill_bucket(net, owner, 180, 3)
        owner.manager.note_contact(members[0].node_id, members[0].address)
        owner.manager.note_contact(members[1].node_id, members[1].address)
        net.kill(members[0])
        with trio.fail_after(300):
            owner.manager.note_contact(members[2].node_id, members[2].address)
            await wait_idle(owner)
            # Seen a moment ago: presumed alive, no ping, the newcomer waits.
            assert owner.manager.statistics().pings == 0
            assert members[2].node_id not in owner.graph
            await trio.sleep(60)  # now they are due a ping
            owner.manager.note_contact(members[2].node_id, members[2].address)
            await wait_idle(owner)
        # The live member once, the dead one twice: a miss gets one more
        # ping, backed off, before the member is evicted.
        assert owner.manager.statistics().pings == 3
        assert members[0].node_id not in owner.graph
        assert members[2].node_id in owner.graph


async def test_pending_newcomers_are_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NodeManagerConfig(
        refresh_interval=None, self_lookup_interval=None, max_pending=2
    )
    async with SimulatedNetwork(config=config, k=1) as net:
        owner = await net.spawn(run=False)  # no eviction worker: the queue fills
        members = await fill_bucket(net, owner, 150, 5)
        for m in members:
            owner.manager.note_contact(m.node_id, m.address)
        stats = owner.manager.statistics()
        assert stats.pending == 2
        assert stats.pending_dropped == 2
        assert len(owner.graph) == 1


async def test_find_stops_at_the_first_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET, transport="direct") as net:
        seed = await net.spawn()
        nodes = [await net.spawn(join=[seed]) for _ in range(30)]
        finder, target = nodes[0], nodes[-1]
        # Everything the finder knows, except the target, hangs when asked.
        for c in list(finder.graph):
            if c.node_id != target.node_id:
                net.kill(net.nodes[c.node_id])
        finder.graph.add(target.node_id, target.address, 0.0)
        with trio.fail_after(300):
            start = trio.current_time()
            found = await finder.manager.find_node(target.node_id)
            # Found at once; the hanging queries were cancelled, not waited for.
            assert trio.current_time() - start < 1.0
        assert found.node_id == target.node_id


async def test_lookup_deadlines(autojump_clock: trio.testing.MockClock) -> None:
    config = NodeManagerConfig(
        refresh_interval=None,
        self_lookup_interval=None,
        query_timeout=10,
        lookup_timeout=25,
    )
    async with SimulatedNetwork(config=config) as net:
        seed = await net.spawn()
        nodes = [await net.spawn(join=[seed]) for _ in range(12)]
        finder = nodes[0]
        for n in nodes[1:]:
            net.kill(n)
        net.kill(seed)
        missing = net.new_node_id()
        with trio.fail_after(300):
            start = trio.current_time()
            with pytest.raises(NodeNotFoundError):
                await finder.manager.find_node(missing)
            elapsed = trio.current_time() - start
        # alpha=3 attempts of 10 s each at a time, cut by the 25 s lookup deadline
        assert elapsed == pytest.approx(25.0)
        stats = finder.manager.statistics()
        assert stats.lookups_timed_out == 1
        assert stats.finds_failed == 1


async def test_note_connection_never_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET, transport="direct") as net:
        a, b = await net.spawn(), await net.spawn()
        a.manager.note_connection(b.node_id, "fe80::1%eth0", 1314)
        assert b.node_id not in a.graph
        a.manager.note_connection(b.node_id, "10.1.1.1", 0)
        assert b.node_id not in a.graph
        a.manager.note_connection(b.node_id, "10.1.1.1", 1314)
        assert b.node_id in a.graph
        a.manager.note_connection(a.node_id, "10.1.1.1", 1314)
        assert a.node_id not in a.graph


class _BuggyFor:
    """A transport that hits a bug of ours (not a peer's failure) whenever
    it talks to ``victim``, and behaves otherwise."""

    def __init__(self, inner: object, victim: object) -> None:
        self.inner = inner
        self.victim = victim

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def closest_nodes(self, node_id: object, *args: object) -> object:
        if node_id == self.victim:
            raise ZeroDivisionError("a bug in our code")
        return await self.inner.closest_nodes(node_id, *args)  # type: ignore[attr-defined]

    async def ping(self, node_id: object, *args: object) -> object:
        if node_id == self.victim:
            raise ZeroDivisionError("a bug in our code")
        return await self.inner.ping(node_id, *args)  # type: ignore[attr-defined]


async def test_a_bug_in_one_attempt_is_told_and_the_lookup_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with SimulatedNetwork(config=QUIET, transport="direct") as net:
        seed = await net.spawn()
        nodes = [await net.spawn(join=[seed]) for _ in range(12)]
        finder, target = nodes[0], nodes[-1]
        victim = next(c.node_id for c in finder.graph if c.node_id != target.node_id)
        finder.manager.transport = _BuggyFor(finder.manager.transport, victim)  # type: ignore[assignment]
        with trio.fail_after(300), caplog.at_level("WARNING", "polykey.nodes.manager"):
            assert not await finder.manager.ping(victim)
            found = await finder.manager.find_node(target.node_id)
        assert found.node_id == target.node_id
        stats = finder.manager.statistics()
        assert stats.unexpected_errors >= 1
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert warned
        assert all(str(victim) in r.getMessage() for r in warned)
        assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in warned)
