"""SimulatedNetwork: many Kademlia nodes in one process, for MockClock tests.

Each :class:`SimNode` is a real :class:`~polykey.nodes.NodeGraph` and
:class:`~polykey.nodes.NodeManager` (timers and eviction worker running in
the network's nursery). How nodes talk is chosen per network:

* ``transport="rpc"`` (the default): every node serves the real node
  handlers on an :class:`~polykey.rpc.RPCServer`, and talks through
  :class:`~polykey.nodes.RPCNodeTransport` over
  :func:`~polykey.rpc.memory_stream_pair` streams: the real handlers, codec,
  validation and timeouts run. About 2 ms of CPU per lookup query.
* ``transport="direct"``: a query calls the peer's ``closest_local`` directly
  (no JSON, no streams), some 30 times cheaper; for networks of thousands
  of nodes (the 1,000-node tests, ``bench/kademlia.py``). Lookups, the graph
  and the manager are the same code.

Reaching a node is what a QUIC dial would be: the address must belong to a
live node with the NodeId asked for (else the attempt fails as an identity
mismatch would), and the callee records the caller as a contact (the
connection manager's ``on_connection``). :meth:`SimulatedNetwork.kill`
makes a node unreachable: ``"timeout"`` (attempts hang until the caller's
deadline, as a silent host does) or ``"refuse"`` (they fail at once).
``latency`` (seconds, virtual under MockClock) is added to every attempt.

Use under ``trio.testing.MockClock(autojump_threshold=0)``; timeouts and
timers then cost no real time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

import attrs
import trio

from ..keys import NodeId
from ..nodes import (
    DEFAULT_K,
    JoinResult,
    NodeAddress,
    NodeContact,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
    NodesAgentAPI,
    NodeTransport,
    RPCNodeTransport,
    node_handlers,
)
from ..rpc import RPCClient, RPCServer, memory_stream_pair

__all__ = ["NetworkStatistics", "SimNode", "SimulatedNetwork", "Unreachable"]

KillMode = Literal["timeout", "refuse"]


class Unreachable(ConnectionError):
    """A simulated dial failed (dead node, wrong NodeId, unknown address)."""


@attrs.define
class NetworkStatistics:
    #: Dial attempts (one per query or ping).
    attempts: int = 0
    #: Attempts that reached the node asked for.
    reached: int = 0
    #: Attempts to a dead node.
    to_dead: int = 0
    #: Attempts where the address belonged to another NodeId.
    wrong_node: int = 0
    #: Attempts to an address no node has.
    unknown_address: int = 0


@attrs.define(eq=False)
class SimNode:
    """One simulated node."""

    node_id: NodeId
    address: NodeAddress
    graph: NodeGraph
    manager: NodeManager
    alive: bool = True
    kill_mode: KillMode = "timeout"
    server: RPCServer | None = None
    scope: trio.CancelScope | None = None
    #: Attempts that reached this node.
    contacted: int = 0

    @property
    def contact(self) -> NodeContact:
        return NodeContact(self.node_id, (self.address,))


class _DirectTransport:
    """NodeTransport that calls the peer's manager without serialising."""

    def __init__(self, network: SimulatedNetwork, node: SimNode) -> None:
        self._network = network
        self._node = node

    async def ping(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> bool:
        await self._network._reach(self._node, node_id, addresses)
        return True

    async def closest_nodes(
        self, node_id: NodeId, addresses: Sequence[NodeAddress], target: NodeId
    ) -> list[NodeContact]:
        peer = await self._network._reach(self._node, node_id, addresses)
        k = peer.graph.k
        caller = self._node.node_id
        # As the handler does: without the caller, at most k.
        found = peer.manager.closest_local(target, k + 1)
        if caller in peer.graph:
            return [
                c for c in found if c.node_id is not caller and c.node_id != caller
            ][:k]
        return found[:k]


class SimulatedNetwork:
    """``async with SimulatedNetwork() as net: a = await net.spawn() ...``"""

    def __init__(
        self,
        *,
        transport: Literal["rpc", "direct"] = "rpc",
        config: NodeManagerConfig | None = None,
        k: int = DEFAULT_K,
        latency: float = 0.0,
        unknown_address: KillMode = "timeout",
        rpc_timeout: float = 15.0,
        seed: int = 0,
    ) -> None:
        if transport not in ("rpc", "direct"):
            raise ValueError("transport must be 'rpc' or 'direct'")
        self.transport = transport
        self.config = config or NodeManagerConfig()
        self.k = k
        self.latency = latency
        self.unknown_address = unknown_address
        self.rpc_timeout = rpc_timeout
        self.rng = random.Random(seed)
        self.nodes: dict[NodeId, SimNode] = {}
        self._by_address: dict[NodeAddress, SimNode] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self.stats = NetworkStatistics()

    async def __aenter__(self) -> Self:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        result: bool | None = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        return result

    # -- nodes ---------------------------------------------------------------

    def new_node_id(self) -> NodeId:
        while True:
            node_id = NodeId(self.rng.randbytes(32))
            if node_id not in self.nodes:
                return node_id

    def _new_address(self) -> NodeAddress:
        n = len(self._by_address) + 1
        return NodeAddress(f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", 1314)

    async def spawn(
        self,
        node_id: NodeId | None = None,
        *,
        join: Sequence[SimNode] = (),
        run: bool = True,
    ) -> SimNode:
        """Start a node (its timers too, unless ``run=False``), then join
        through ``join`` if given."""
        if self._nursery is None:
            raise RuntimeError("use the network as an async context manager")
        node_id = node_id or self.new_node_id()
        if node_id in self.nodes:
            raise ValueError(f"node {node_id} already exists")
        address = self._new_address()
        graph = NodeGraph(node_id, k=self.k)
        node = SimNode(node_id, address, graph, None)  # type: ignore[arg-type]
        transport: NodeTransport
        if self.transport == "rpc":
            transport = RPCNodeTransport(
                lambda n, a: self._connect(node, n, a), limit=self.k
            )
        else:
            transport = _DirectTransport(self, node)
        node.manager = NodeManager(
            graph,
            transport,
            config=self.config,
            rng=random.Random(self.rng.getrandbits(64)),
            clock=trio.current_time,
        )
        self.nodes[node_id] = node
        self._by_address[address] = node
        await self._nursery.start(self._run_node, node, run)
        if join:
            await self.join(node, join)
        return node

    async def _run_node(
        self, node: SimNode, run: bool, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.CancelScope() as scope:
            node.scope = scope
            async with trio.open_nursery() as nursery:
                if self.transport == "rpc":
                    node.server = await nursery.start(
                        RPCServer(
                            node_handlers(node.graph), timeout=self.rpc_timeout
                        ).run
                    )
                if run:
                    await nursery.start(node.manager.run)
                task_status.started()

    async def join(self, node: SimNode, seeds: Sequence[SimNode]) -> JoinResult:
        return await node.manager.join([s.contact for s in seeds])

    def kill(self, node: SimNode, *, mode: KillMode = "timeout") -> None:
        """Make ``node`` unreachable and stop its tasks."""
        node.alive = False
        node.kill_mode = mode
        if node.scope is not None:
            node.scope.cancel()

    def live_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    # -- reaching nodes ------------------------------------------------------

    async def _fail(self, mode: KillMode, why: str) -> SimNode:
        if mode == "timeout":
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        raise Unreachable(why)

    async def _reach(
        self, caller: SimNode, node_id: NodeId, addresses: Sequence[NodeAddress]
    ) -> SimNode:
        """The node ``node_id`` as a dial to ``addresses`` would reach it."""
        self.stats.attempts += 1
        if self.latency:
            await trio.sleep(self.latency)
        for address in addresses:
            peer = self._by_address.get(address)
            if peer is None:
                continue
            if peer.node_id != node_id:
                self.stats.wrong_node += 1
                continue
            if not peer.alive:
                self.stats.to_dead += 1
                return await self._fail(peer.kill_mode, f"{node_id} is down")
            if not self.latency:
                await trio.lowlevel.checkpoint()
            self.stats.reached += 1
            peer.contacted += 1
            # The callee sees a verified connection from the caller.
            if caller.alive:
                peer.manager.note_contact(caller.node_id, caller.address)
            return peer
        self.stats.unknown_address += 1
        return await self._fail(
            self.unknown_address, f"{node_id} not at {list(addresses)}"
        )

    async def _connect(
        self, caller: SimNode, node_id: NodeId, addresses: Sequence[NodeAddress]
    ) -> RPCClient[Any]:
        peer = await self._reach(caller, node_id, addresses)
        meta = {
            "node_id": caller.node_id,
            "host": caller.address.host,
            "port": caller.address.port,
        }

        async def open_stream() -> trio.abc.HalfCloseableStream:
            server = peer.server
            if server is None or not peer.alive:
                raise Unreachable(f"{peer.node_id} is down")
            ours, theirs = memory_stream_pair()
            await server.handle_stream(theirs, meta)
            return ours

        return RPCClient(NodesAgentAPI, open_stream, timeout=self.rpc_timeout)
