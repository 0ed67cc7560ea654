"""PolykeyNode: the layers composed into a running node.

Start-up order: identity (state directory), node graph (SQLite in the state
directory), QUIC socket, RPC server with the node methods, node connections
(server and client on the one socket), the node manager's timers, then
joining through the seed nodes in the background. Shutdown is the reverse:
lookups and timers stop, connections close with a code (in a shielded scope,
so a cancelled shutdown still finishes), the graph is flushed and closed.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket as stdlib_socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import attrs
import trio

from ._control import serve_control
from ._limits import NodeLimits
from ._metrics import serve_metrics
from ._state import default_state_dir, load_or_create_identity, lock_state_dir
from .keys import NodeId, NodeIdentity
from .nodes import (
    PEER_FAILURES,
    ActiveConnection,
    Address,
    Circuit,
    ConnectionPath,
    ConnectionTransport,
    InvalidAddressError,
    JoinResult,
    LookupResult,
    NodeAddress,
    NodeConnection,
    NodeConnectionManager,
    NodeContact,
    NodeFinder,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
    RelayLimits,
    SignalRequest,
    display_address,
    format_host_port,
    node_handlers,
    parse_host_port,
    relay_handlers,
    sticky_ttl,
)
from .quic import QUICConfig, QUICSocket
from .rpc import ClientManifest, Handler, JSONObject, RPCClient, RPCServer

__all__ = [
    "DEFAULT_PORT",
    "EVENT_BUFFER",
    "NodeEvent",
    "NodeLimits",
    "NodeSettings",
    "PolykeyNode",
    "SeedNode",
    "default_state_dir",
    "dialable_host",
]

log = logging.getLogger("polykey.node")

M = TypeVar("M", bound=ClientManifest)
T = TypeVar("T")


def _running(part: T | None) -> T:
    """A running node's part; ClosedResourceError when it is not running."""
    if part is None:
        raise trio.ClosedResourceError("the node is not running")
    return part


#: The port a node listens on by default (Polykey's seed nodes use it too).
DEFAULT_PORT = 1314


@attrs.frozen
class SeedNode:
    """A node to join the network through: ``NODEID@HOST:PORT``."""

    node_id: NodeId
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SeedNode:
        """Parse ``NODEID@HOST:PORT`` (``NODEID@[V6]:PORT`` for IPv6)."""
        node_part, sep, address = text.partition("@")
        if not sep:
            raise ValueError(f"seed {text!r}: expected NODEID@HOST:PORT")
        node_id = NodeId.from_string(node_part)
        # What cannot be dialled is refused here, at parse time: "::" or
        # "0.0.0.0" (a listening address, not one to dial), multicast,
        # scoped IPv6, malformed names.  Hostnames are kept and resolved
        # when dialled.
        try:
            parsed = parse_host_port(address)
        except InvalidAddressError as exc:
            raise ValueError(f"seed {text!r}: {exc}") from None
        return cls(node_id, parsed.host, parsed.port)

    @property
    def address(self) -> NodeAddress:
        return NodeAddress(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.node_id}@{format_host_port(self.host, self.port)}"


@attrs.frozen(kw_only=True)
class NodeSettings:
    """Everything a node needs; the defaults are what ``python -m polykey
    node`` runs with."""

    state_dir: Path = attrs.field(factory=default_state_dir)
    host: str = "::"
    port: int = DEFAULT_PORT
    seeds: tuple[SeedNode, ...] = ()
    #: DATAGRAM frames on: relayed connections travel in them.
    quic: QUICConfig = attrs.field(factory=lambda: QUICConfig(datagram_queue=8192))
    #: Relaying for others: "auto" (while no peer sees us behind a NAT),
    #: "on", or "off"; within ``relay_limits``.
    relay: str = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "on", "off"))
    )
    relay_limits: RelayLimits = attrs.field(factory=RelayLimits)
    #: What peers (and control clients) may make the node hold; its QUIC
    #: limits replace the same fields of ``quic``.
    limits: NodeLimits = attrs.field(factory=NodeLimits)
    #: ``(host, port)`` to serve Prometheus metrics on (None: off).
    metrics: Address | None = None
    #: Default timeout of the agent's RPC server and of calls to peers
    #: (Polykey's agent uses 15 s).
    rpc_timeout: float = 15.0
    #: Kademlia tunables (Polykey's by default).
    nodes: NodeManagerConfig = attrs.field(factory=NodeManagerConfig)
    #: Extra RPC methods to serve, beside the node's own.
    handlers: dict[str, Handler[Any, Any]] = attrs.field(factory=dict)


def dialable_host(bound_host: str) -> tuple[str, bool]:
    """A host peers can dial for a socket bound to ``bound_host``, and
    whether it is only a guess.

    A specific address is its own answer.  For a wildcard (``::``,
    ``0.0.0.0``) it is the address this host sends from toward the default
    route (IPv4 first, as most peers have it), found by connecting a UDP
    socket, which sends nothing; with no route at all, loopback, which
    serves only this host.
    """
    ip = ipaddress.ip_address(bound_host)
    if not ip.is_unspecified:
        return bound_host, False
    probes = [(stdlib_socket.AF_INET, "192.0.2.1")]  # TEST-NET-1: never answered
    if ip.version == 6:
        probes.append((stdlib_socket.AF_INET6, "2001:db8::1"))
    for family, target in probes:
        probe = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
        try:
            probe.connect((target, 9))
            host = str(probe.getsockname()[0])
        except OSError:
            continue
        finally:
            probe.close()
        if not ipaddress.ip_address(host).is_unspecified:
            return host, True
    return ("127.0.0.1" if ip.version == 4 else "::1"), True


@attrs.frozen
class NodeEvent:
    """Something that happened to a node: ``kind`` is "connected" (with the
    peer's ``node_id``, ``path`` and whether we dialled), "disconnected"
    (its last connection ended), or "joined" (joining through the seeds
    is over)."""

    kind: str
    node_id: NodeId | None = None
    path: str | None = None
    outgoing: bool | None = None


#: Events a subscriber may fall behind by before the oldest are dropped.
EVENT_BUFFER = 256


class _NodeHost:
    """The node's connection manager as the signalling and relay handlers'
    host (:class:`~polykey.nodes._signalling.SignalHost`,
    :class:`~polykey.nodes._relay.RelayHost`): the handlers are made before
    the manager, which needs the RPC server that serves them."""

    def __init__(self, node: PolykeyNode) -> None:
        self._node = node

    @property
    def identity(self) -> NodeIdentity:
        return self._node.connections.identity

    def live_connection(self, node_id: NodeId) -> NodeConnection | None:
        return self._node.connections.live_connection(node_id)

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        self._node.connections.forward_signal(target, params)

    def punch(self, request: SignalRequest) -> None:
        self._node.connections.punch(request)

    def now(self) -> float:
        return trio.current_time()

    def relay_reserve(self, node_id: NodeId, ip: str) -> float:
        return self._node.connections.relay_reserve(node_id, ip)

    async def relay_connect(self, source: NodeId, target: NodeId) -> Circuit:
        return await self._node.connections.relay_connect(source, target)

    def relay_stop(self, relay: NodeId, source: NodeId, circuit_id: bytes) -> None:
        self._node.connections.relay_stop(relay, source, circuit_id)


class PolykeyNode:
    """A running node: ``async with PolykeyNode(settings) as node: ...``."""

    def __init__(self, settings: NodeSettings | None = None) -> None:
        self.settings = settings or NodeSettings()
        self.identity: NodeIdentity | None = None
        self.joined: JoinResult | None = None
        self._joined_event = trio.Event()
        #: Set by :meth:`request_stop` (``agent stop`` on the control
        #: socket); whoever runs the node leaves its ``async with`` then.
        self.stop_requested = trio.Event()
        #: Wall-clock time (seconds since the epoch) the node started.
        self.started_at = 0.0
        #: Where ``/metrics`` is served (with ``NodeSettings.metrics``).
        self.metrics_address: Address | None = None
        self._subscribers: list[trio.MemorySendChannel[NodeEvent]] = []
        #: Events dropped because a subscriber fell behind.
        self.events_dropped = 0
        #: Bugs of the node's own tasks (the join), caught and logged at
        #: WARNING (``polykey_bugs_total{where="node"}``).
        self.bugs = 0
        # The running parts: all None outside ``async with`` (their
        # properties raise trio.ClosedResourceError then).
        self._graph: NodeGraph | None = None
        self._manager: NodeManager | None = None
        self._finder: NodeFinder | None = None
        self._connections: NodeConnectionManager | None = None
        self._rpc: RPCServer | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def node_id(self) -> NodeId:
        if self.identity is None:
            raise trio.ClosedResourceError("the node is not running")
        return self.identity.node_id

    @property
    def connections(self) -> NodeConnectionManager:
        return _running(self._connections)

    @property
    def graph(self) -> NodeGraph:
        return _running(self._graph)

    @property
    def manager(self) -> NodeManager:
        return _running(self._manager)

    @manager.setter
    def manager(self, manager: NodeManager) -> None:
        # polykey.testing's networks run a node's manager over their links.
        self._manager = manager

    @property
    def finder(self) -> NodeFinder:
        return _running(self._finder)

    @finder.setter
    def finder(self, finder: NodeFinder) -> None:
        self._finder = finder

    @property
    def rpc_server(self) -> RPCServer:
        """The server of the node's RPC methods (for its statistics)."""
        return _running(self._rpc)

    @property
    def address(self) -> Address:
        return display_address(self.connections.socket.local_address)

    async def __aenter__(self) -> PolykeyNode:
        if self._stack is not None:
            raise trio.BusyResourceError("the node is already running")
        settings = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            # First the lock, so a second node on this directory touches
            # nothing (not the identity, not the graph) and fails at once.
            stack.callback(lock_state_dir(settings.state_dir).release)
            identity, created = load_or_create_identity(settings.state_dir)
            self.identity = identity
            log.info(
                "%s identity %s in %s",
                "created" if created else "loaded",
                identity.node_id,
                settings.state_dir,
            )
            graph = NodeGraph.open(
                settings.state_dir / "nodes.sqlite3",
                identity.node_id,
                previous_ids=identity.chain.node_ids()[1:],
            )
            stack.callback(graph.close)
            self._graph = graph
            socket = await stack.enter_async_context(
                QUICSocket(settings.host, settings.port)
            )
            handlers = {
                **node_handlers(
                    graph,
                    active_connections=self._active_connections,
                    signal_host=_NodeHost(self),
                ),
                **relay_handlers(
                    _NodeHost(self),
                    None if settings.relay == "off" else settings.relay_limits,
                ),
                **settings.handlers,
            }
            limits = settings.limits
            rpc = self._rpc = await stack.enter_async_context(
                RPCServer(
                    handlers,
                    timeout=settings.rpc_timeout,
                    max_message_size=limits.max_message_size,
                    max_calls=limits.max_calls,
                    max_calls_per_connection=limits.max_calls_per_connection,
                )
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            # Registered at once: should a start below fail, unwinding the
            # stack cancels the tasks already started instead of waiting
            # for them for ever.
            stack.callback(nursery.cancel_scope.cancel)
            connections = self._connections = NodeConnectionManager(
                socket,
                identity,
                rpc,
                config=limits.quic_config(settings.quic),
                rpc_timeout=settings.rpc_timeout,
                on_connection=self._on_connection,
                on_disconnect=self._on_disconnect,
                ttl_for=functools.partial(sticky_ttl, identity.node_id),
                relay=None if settings.relay == "off" else settings.relay_limits,
                relay_mode=settings.relay,
            )
            manager = self._manager = NodeManager(
                graph,
                ConnectionTransport(connections),
                config=limits.nodes_config(settings.nodes),
                attempts=connections.attempts,
            )
            self._finder = NodeFinder(manager, connections)
            await nursery.start(connections.run)
            await nursery.start(manager.run)
            await nursery.start(
                functools.partial(
                    serve_control,
                    self,
                    settings.state_dir,
                    max_clients=limits.control_clients,
                )
            )
            if settings.metrics is not None:
                self.metrics_address = await nursery.start(
                    serve_metrics, self, *settings.metrics
                )
            if settings.seeds:
                nursery.start_soon(self._join)
        except BaseException:
            self._forget_parts()
            self.identity = None
            await stack.aclose()
            raise
        self._stack = stack
        self.started_at = time.time()
        host, port = self.address
        log.info(
            "node %s listening on %s", identity.node_id, format_host_port(host, port)
        )
        return self

    def _forget_parts(self) -> None:
        self._connections = self._rpc = None
        self._graph = self._manager = self._finder = None

    async def _join(self) -> None:
        seeds = [
            NodeContact(seed.node_id, (seed.address,)) for seed in self.settings.seeds
        ]
        for seed in self.settings.seeds:
            # Kept for good: seeds signal and relay for us.
            self.connections.anchor(seed.node_id, [(seed.host, seed.port)])
        try:
            result = await self.manager.join(seeds)
        except PEER_FAILURES as exc:
            # The network's doing, though the manager absorbs most of it:
            # one line for the operator; the node keeps serving.
            log.warning("joining through the seeds failed: %s", exc)
        except Exception:
            # A bug of ours: told with its traceback and counted; the node
            # keeps serving, and wait_joined() still returns.
            self.bugs += 1
            log.warning(
                "joining through the seeds failed unexpectedly (a bug)", exc_info=True
            )
        else:
            self.joined = result
            log.info(
                "joined through %d of %d seeds; %d nodes in the graph",
                result.seeds_reached,
                len(seeds),
                len(self.graph),
            )
        finally:
            self._joined_event.set()
            self._emit(NodeEvent("joined"))

    def _active_connections(self) -> list[ActiveConnection]:
        # What nodesClosestActiveConnectionsGet lists: connections we could
        # signal over, at the address the peer is seen at. A relayed one
        # has no such address (its is a virtual path's, ours alone).
        return [
            ActiveConnection(
                node_id=node.node_id,
                address=NodeAddress(*node.address),
                primary=True,
            )
            for node in self.connections.active()
            if node.path is not ConnectionPath.RELAYED
        ]

    def request_stop(self) -> None:
        """Ask whoever runs the node to stop it (sets :attr:`stop_requested`)."""
        log.info("stop requested")
        self.stop_requested.set()

    def relay_status(self) -> dict[str, Any]:
        """Whether we relay for others, and the relay's counters."""
        connections = self.connections
        table = connections.relay_table
        serving = table is not None and not (
            connections.relay_mode == "auto" and connections.behind_nat()
        )
        stats = attrs.asdict(table.statistics) if table is not None else {}
        return {"mode": self.settings.relay, "serving": serving, **stats}

    def _on_connection(
        self, node_id: NodeId, host: str, port: int, outgoing: bool
    ) -> None:
        self.manager.note_connection(node_id, host, port, outgoing)
        pooled = self.connections.get(node_id)
        path = pooled.path.value if pooled is not None else None
        self._emit(NodeEvent("connected", node_id, path, outgoing))

    def _on_disconnect(self, node_id: NodeId) -> None:
        self.manager.note_disconnect(node_id)
        self._emit(NodeEvent("disconnected", node_id))

    def _emit(self, event: NodeEvent) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.events_dropped += 1
            except trio.BrokenResourceError:
                self._subscribers.remove(channel)

    @contextlib.contextmanager
    def events(self) -> Iterator[trio.MemoryReceiveChannel[NodeEvent]]:
        """Subscribe to node events while the block runs::

            with node.events() as events:
                async for event in events:
                    ...

        A subscriber that falls :data:`EVENT_BUFFER` events behind loses the
        newest (counted in ``events_dropped``), never blocks the node."""
        send, receive = trio.open_memory_channel[NodeEvent](EVENT_BUFFER)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    async def wait_joined(self) -> JoinResult | None:
        """Wait until joining through the seeds finished (None: no seeds)."""
        if self.settings.seeds:
            await self._joined_event.wait()
        return self.joined

    async def find_node(self, node_id: NodeId) -> NodeContact:
        """Find ``node_id`` in the network by an iterative lookup; raises
        :class:`polykey.nodes.NodeNotFoundError`."""
        return await self.manager.find_node(node_id)

    async def lookup(self, target: NodeId) -> LookupResult:
        """The nodes closest to ``target`` that answered."""
        return await self.manager.lookup(target)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            raise trio.ClosedResourceError("the node is not running")
        # Close connections with a code first, even when cancelled; the
        # stack (entered in __aenter__, so exited outside any new scope)
        # then stops the tasks and the socket.
        with trio.CancelScope(shield=True):
            if self._connections is not None:
                await self._connections.aclose()
        try:
            result = await stack.__aexit__(exc_type, exc_value, traceback)
        finally:
            self._forget_parts()
        log.info("node stopped")
        return bool(result)

    async def client(self, node_id: NodeId, manifest: type[M]) -> RPCClient[M]:
        """A typed RPC client to ``node_id``, by NodeId alone (see
        :meth:`connect`), bounded by the caller's cancel scope."""
        conn = await self.connect(node_id)
        return conn.client(manifest)

    async def connect(
        self, node_id: NodeId, address: Address | None = None
    ) -> NodeConnection:
        """A verified connection to ``node_id``: at ``address`` when given,
        else by NodeId alone (pooled, found and dialled, or hole-punched
        through a signaller; see :class:`polykey.nodes.NodeFinder`). The
        caller's cancel scope bounds it; raises NodeConnectionError or
        NodeNotFoundError."""
        if address is not None:
            return await self.connections.connect(node_id, address)
        link = await self.finder.connect(node_id)
        assert isinstance(link, NodeConnection)  # the finder runs on ours
        return link
