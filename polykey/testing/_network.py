"""SimulatedNetwork: many Kademlia nodes in one process, for MockClock tests.

Each :class:`SimNode` is a real :class:`~polykey.nodes.NodeGraph` and
:class:`~polykey.nodes.NodeManager` (timers and eviction worker running in
the network's nursery) talking through
:class:`~polykey.nodes.ConnectionTransport`, the transport a node runs, over
a simulated pool in place of the QUIC connection manager. What a
connection's RPC is, is chosen per network:

* ``transport="rpc"`` (the default): every node serves the real node
  handlers on an :class:`~polykey.rpc.RPCServer`, and a connection is an
  :class:`~polykey.rpc.RPCClient` over :func:`~polykey.rpc.memory_stream_pair`
  streams: the real handlers, codec, validation and timeouts run. About
  2 ms of CPU per lookup query.
* ``transport="direct"``: a query runs the peer's real handler in the
  caller's task and hands its messages to the real parser (no JSON text,
  no streams, no server tasks), about 0.8 ms of CPU per query; for
  networks of thousands of nodes (the 1,000-node tests,
  ``bench/kademlia.py``).

Either way the transport, lookups, the graph, the manager and the handlers
are the code a node runs. Reaching a node is what a QUIC dial would be: the
address must belong to a live node with the NodeId asked for (else the
attempt fails at once, as an identity mismatch would), and both ends note
the connection as the connection manager's ``on_connection`` does (the
callee's record of the caller is unconfirmed until it dials it back).
Nothing is pooled: every query or ping dials, so :class:`NetworkStatistics`
counts one attempt per query, ping, dial-back and address tried. No
connection ever ends by itself: a test ends one with the manager's
``note_disconnect``, which dials an unconfirmed node back through the same
simulated dial.
:meth:`SimulatedNetwork.kill` makes a node unreachable: ``"timeout"``
(attempts hang until the caller's deadline, as a silent host does) or
``"refuse"`` (they fail at once). ``latency`` (seconds, virtual under
MockClock) is added to every attempt.

Use under ``trio.testing.MockClock(autojump_threshold=0)``; timeouts and
timers then cost no real time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Literal, Self

import attrs
import trio

from ..keys import NodeId
from ..nodes import (
    DEFAULT_K,
    ConnectionTransport,
    JoinResult,
    NodeAddress,
    NodeContact,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
    NodesAgentAPI,
    node_handlers,
)
from ..quic import Address
from ..rpc import (
    CallContext,
    Handler,
    JSONObject,
    JSONValue,
    RPCClient,
    RPCMethodNotFound,
    RPCServer,
    ServerHandler,
    memory_stream_pair,
)

__all__ = [
    "NetworkStatistics",
    "SimConnection",
    "SimNode",
    "SimulatedNetwork",
    "Unreachable",
]

KillMode = Literal["timeout", "refuse"]


class Unreachable(ConnectionError):
    """A simulated dial failed (dead node, wrong NodeId, unknown address)."""


@attrs.define
class NetworkStatistics:
    #: Dial attempts (one per query or ping and address tried).
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
    #: The node handlers it serves (``node_handlers`` of its graph).
    handlers: dict[str, Handler[Any, Any]] = attrs.Factory(dict)
    server: RPCServer | None = None
    scope: trio.CancelScope | None = None
    #: Attempts that reached this node.
    contacted: int = 0

    @property
    def contact(self) -> NodeContact:
        return NodeContact(self.node_id, (self.address,))


@attrs.define(eq=False)
class SimConnection:
    """A simulated connection from one node to ``peer``: what the pool of
    :class:`~polykey.nodes.ConnectionTransport` hands out (``rpc`` is what
    the node RPC calls go over)."""

    peer: SimNode
    rpc: Any


class _InProcessRPC:
    """Where ``transport="direct"`` puts a connection's RPC client: a server
    stream runs the peer's own handler in the caller's task, with the
    caller's verified identity in its context, and hands its messages to
    the caller's parser; what is skipped is the JSON text, the streams and
    the RPC server's tasks."""

    def __init__(
        self, handlers: dict[str, Handler[Any, Any]], meta: JSONObject
    ) -> None:
        self._handlers = handlers
        self._meta = meta

    @asynccontextmanager
    async def server_stream(
        self, method: str, params: JSONValue = None
    ) -> AsyncIterator[AsyncIterator[JSONValue]]:
        handler = self._handlers.get(method)
        if not isinstance(handler, ServerHandler):
            raise RPCMethodNotFound(f"{method} is not a server-streaming method here")
        parsed = handler.parse_params(params)
        with trio.CancelScope() as scope:
            ctx = CallContext(method, "server", scope, transport=self._meta)
            messages = [m async for m in handler.handle(parsed, ctx)]
        yield _iterate(messages)


async def _iterate(messages: list[JSONValue]) -> AsyncIterator[JSONValue]:
    for message in messages:
        yield message


class _SimPool:
    """One node's side of the network, as the connection manager is a
    node's: what :class:`~polykey.nodes.ConnectionTransport` needs (``get``
    and ``connect``). Nothing is pooled: every query or ping dials, as a
    node does once its connections have idled out."""

    def __init__(self, network: SimulatedNetwork, node: SimNode) -> None:
        self._network = network
        self._node = node

    def get(self, node_id: NodeId) -> SimConnection | None:
        return None

    async def connect(self, node_id: NodeId, address: Address) -> SimConnection:
        return await self._network._connect(self._node, node_id, NodeAddress(*address))

    async def dial_back(self, node_id: NodeId, address: Address) -> bool:
        # A dial like any other (nothing is pooled, so none is in flight).
        await self._network._reach(self._node, node_id, NodeAddress(*address))
        return True


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
        node.handlers = node_handlers(graph, limit=self.k)
        node.manager = NodeManager(
            graph,
            ConnectionTransport(_SimPool(self, node), limit=self.k),
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
                        RPCServer(node.handlers, timeout=self.rpc_timeout).run
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
        self, caller: SimNode, node_id: NodeId, address: NodeAddress
    ) -> SimNode:
        """The node ``node_id`` as a dial to ``address`` would reach it."""
        self.stats.attempts += 1
        if self.latency:
            await trio.sleep(self.latency)
        peer = self._by_address.get(address)
        if peer is None:
            self.stats.unknown_address += 1
            return await self._fail(self.unknown_address, f"{node_id} not at {address}")
        if peer.node_id != node_id:
            # As QUIC's verification of the pinned NodeId fails at once.
            self.stats.wrong_node += 1
            return await self._fail("refuse", f"{address} is not {node_id}")
        if not peer.alive:
            self.stats.to_dead += 1
            return await self._fail(peer.kill_mode, f"{node_id} is down")
        if not self.latency:
            await trio.lowlevel.checkpoint()
        self.stats.reached += 1
        peer.contacted += 1
        # Both ends see a verified connection: the connection manager's
        # on_connection, outgoing at the caller, incoming at the callee.
        if caller.alive:
            peer.manager.note_connection(
                caller.node_id, caller.address.host, caller.address.port, False
            )
            caller.manager.note_connection(peer.node_id, address.host, address.port)
        return peer

    async def _connect(
        self, caller: SimNode, node_id: NodeId, address: NodeAddress
    ) -> SimConnection:
        peer = await self._reach(caller, node_id, address)
        meta: JSONObject = {
            "node_id": caller.node_id,
            "host": caller.address.host,
            "port": caller.address.port,
        }
        if self.transport == "direct":
            return SimConnection(peer, _InProcessRPC(peer.handlers, meta))

        async def open_stream() -> trio.abc.HalfCloseableStream:
            server = peer.server
            if server is None or not peer.alive:
                raise Unreachable(f"{peer.node_id} is down")
            ours, theirs = memory_stream_pair()
            await server.handle_stream(theirs, meta)
            return ours

        return SimConnection(
            peer, RPCClient(NodesAgentAPI, open_stream, timeout=self.rpc_timeout)
        )
