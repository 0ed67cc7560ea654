"""A node that only connected to us is dialled back when its connection
ends: kept if that reaches it, gone if not, and the dial-backs bounded.

The first tests run on the simulated network under MockClock (no
connection ends there by itself: ``note_disconnect`` is the connection
manager's ``on_disconnect``); the last ones on real nodes over QUIC on
loopback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from polykey.agent import NodeLimits
from polykey.keys import NodeId
from polykey.nodes import NodeAddress, NodeContact, NodeManagerConfig, NodeTransport
from polykey.testing._network import SimNode, SimulatedNetwork

from .helpers import wait_for
from .test_relay import nodes

QUIET = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)


async def dialled_in(net: SimulatedNetwork, seed: SimNode) -> SimNode:
    """A node that only ever dialled ``seed``: unconfirmed there."""
    node = await net.spawn()
    assert await node.manager.ping(seed.node_id, [seed.address])
    assert node.node_id in seed.graph
    assert not seed.manager.confirmed(node.node_id)
    return node


async def test_a_node_reached_by_its_dial_back_stays_and_is_found(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET) as net:
        seed = await net.spawn()
        target = await dialled_in(net, seed)
        with trio.fail_after(60):
            seed.manager.note_disconnect(target.node_id)
            await trio.sleep(30)
            stats = seed.manager.statistics()
            assert stats.confirmed_by_dialback == 1
            assert stats.removed_unconfirmed == 0
            assert seed.manager.confirmed(target.node_id)
            assert target.node_id in seed.graph
            # A third node that knows only the seed finds it through the seed.
            third = await net.spawn()
            third.manager.note_contact(seed.node_id, seed.address)
            found = await third.manager.find_node(target.node_id)
            assert found.addresses == (target.address,)


async def test_a_node_not_reached_by_its_dial_back_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with SimulatedNetwork(config=QUIET) as net:
        seed = await net.spawn()
        silent, refusing = await dialled_in(net, seed), await dialled_in(net, seed)
        net.kill(silent)  # its dial-back hangs until the attempt deadline
        net.kill(refusing, mode="refuse")
        with trio.fail_after(60):
            seed.manager.note_disconnect(silent.node_id)
            seed.manager.note_disconnect(refusing.node_id)
            await trio.sleep(30)
        stats = seed.manager.statistics()
        assert stats.dialbacks == 2
        assert stats.dialback_failed == 2
        assert stats.confirmed_by_dialback == 0
        assert stats.removed_unconfirmed == 2
        assert silent.node_id not in seed.graph
        assert refusing.node_id not in seed.graph


async def test_a_node_that_connected_again_stays_unconfirmed_until_it_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed dial-back does not remove a node whose new connection lives;
    its next disconnect decides."""
    async with SimulatedNetwork(config=QUIET) as net:
        seed = await net.spawn()
        node = await dialled_in(net, seed)
        net.kill(node)
        with trio.fail_after(300):
            seed.manager.note_disconnect(node.node_id)
            # Connected again while the dial-back waits for its deadline.
            seed.manager.note_connection(node.node_id, *node.address.as_tuple(), False)
            await trio.sleep(30)
            assert seed.manager.statistics().dialback_failed == 1
            assert node.node_id in seed.graph
            assert not seed.manager.confirmed(node.node_id)
            seed.manager.note_disconnect(node.node_id)
            await trio.sleep(30)
        assert node.node_id not in seed.graph
        assert seed.manager.statistics().removed_unconfirmed == 1


class _Counting:
    """A node's transport, counting how many dial-backs ran at once."""

    def __init__(self, inner: NodeTransport) -> None:
        self.inner = inner
        self.running = self.most = self.calls = 0

    async def ping(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> bool:
        return await self.inner.ping(node_id, addresses)

    async def closest_nodes(
        self, node_id: NodeId, addresses: Sequence[NodeAddress], target: NodeId
    ) -> Sequence[NodeContact]:
        return await self.inner.closest_nodes(node_id, addresses, target)

    async def dial_back(self, node_id: NodeId, address: NodeAddress) -> bool:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await self.inner.dial_back(node_id, address)
        finally:
            self.running -= 1


async def test_a_flood_of_disconnects_is_dialled_back_within_the_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NodeManagerConfig(
        refresh_interval=None,
        self_lookup_interval=None,
        dialback_limit=3,
        dialback_queue=10,
    )
    async with SimulatedNetwork(config=config) as net:
        seed = await net.spawn()
        counting = _Counting(seed.manager.transport)
        seed.manager.transport = counting
        clients = [await dialled_in(net, seed) for _ in range(30)]
        for client in clients:
            net.kill(client)
        with trio.fail_after(600):
            for client in clients:
                seed.manager.note_disconnect(client.node_id)
                # One NodeId is never queued twice.
                seed.manager.note_disconnect(client.node_id)
            await trio.sleep(300)
        stats = seed.manager.statistics()
        # 3 taken by the waiting workers, 10 queued; the other 17 left at
        # once, not dialled.
        assert stats.dialbacks_dropped == 17
        assert counting.calls == stats.dialbacks == 13
        assert counting.most == 3
        assert stats.removed_unconfirmed == 30
        assert len(seed.graph) == 0


# -- real nodes over QUIC on loopback ------------------------------------------------


async def test_a_node_that_only_dialled_in_is_found_after_its_connection_ends(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with nodes(tmp_path, ("seed", {}), ("target", {}), ("third", {})) as (
            seed,
            target,
            third,
        ):
            await target.connect(seed.node_id, seed.address)
            await wait_for(lambda: target.node_id in seed.graph)
            assert not seed.manager.confirmed(target.node_id)
            # The seed's connection to it ends (as its TTL would end it).
            conn = seed.connections.get(target.node_id)
            assert conn is not None
            conn.connection.close(0x1, b"idle")
            await wait_for(lambda: seed.manager.statistics().dialbacks > 0)
            await wait_for(lambda: seed.manager.confirmed(target.node_id))
            stats = seed.manager.statistics()
            assert stats.confirmed_by_dialback == 1
            assert stats.removed_unconfirmed == 0
            # The dial-back's connection was not kept.
            assert seed.connections.get(target.node_id) is None
            third.manager.note_contact(seed.node_id, NodeAddress(*seed.address))
            found = await third.manager.find_node(target.node_id)
            assert found.addresses[0].as_tuple() == target.address


async def test_a_node_whose_socket_closed_is_not_kept(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with nodes(tmp_path, ("seed", {}), ("gone", {})) as (seed, gone):
            await gone.connect(seed.node_id, seed.address)
            await wait_for(lambda: gone.node_id in seed.graph)
            # It stops serving: its connections close, and its server.
            await gone.connections.aclose()
            await wait_for(lambda: gone.node_id not in seed.graph)
            stats = seed.manager.statistics()
            assert stats.dialbacks == stats.dialback_failed == 1
            assert stats.removed_unconfirmed == 1


async def test_a_flood_of_clients_is_dialled_back_at_most_limit_at_once(
    tmp_path: Path,
) -> None:
    from tests.helpers import dial

    # On a node the limits come with its NodeLimits (the `node` flags).
    limit = NodeLimits(dialback_limit=2, dialback_queue=64)
    with trio.fail_after(120):
        async with nodes(tmp_path, ("seed", {"limits": limit})) as (seed,):
            counting = _Counting(seed.manager.transport)
            seed.manager.transport = counting
            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(dial, seed.node_id, seed.address)

            def settled() -> bool:
                stats = seed.manager.statistics()
                tried = stats.dialbacks + stats.dialbacks_dropped
                return tried == 12 and counting.running == 0

            await wait_for(settled, 80)
            stats = seed.manager.statistics()
            assert stats.dialbacks + stats.dialbacks_dropped == 12
            assert counting.calls == stats.dialbacks
            assert counting.most == 2
            assert len(seed.graph) == 0
