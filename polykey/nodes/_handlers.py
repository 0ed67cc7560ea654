"""The node-to-node (agent) RPC methods: handlers, client manifest, calls.

Polykey's methods, same names and shapes (src/nodes/agent/handlers):

* ``nodesClosestLocalNodesGet`` (server stream): params ``{"nodeIdEncoded"}``;
  one ``NodeContactMessage`` per node of the k (20) closest in our graph,
  closest first. Nodes we recently failed to reach, and the caller itself,
  are left out.
* ``nodesClosestActiveConnectionsGet`` (server stream): params
  ``{"nodeIdEncoded"}``; one ``ActiveConnectionDataMessage`` per node we hold
  a live connection to, the 20 closest to the target.
* ``nodesConnectionSignalInitial`` and ``nodesConnectionSignalFinal``
  (unary): hole-punch signalling, see :mod:`polykey.nodes._signalling`.

And our extension (Polykey pings by connecting; a pooled connection needs a
cheap liveness check):

* ``nodesPing`` (unary): params ``{}``; result ``{"type": "success",
  "success": true, "address": {"host", "port"}}``, the address being the
  caller's as we see it (its reflexive address).

Every handler validates its params (``RPCInvalidParams`` otherwise). The
``request_*`` functions are the client side: they work on any
:class:`~polykey.rpc.RPCClient` (with or without :class:`NodesAgentAPI`),
read at most ``limit`` messages (the stream is reset past that) and drop
malformed entries, so a peer cannot make us hold more than ``limit``
contacts of 5 addresses each. Message size is capped by the RPC layer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final

from ..keys import NodeId
from ..rpc import (
    CallContext,
    ClientManifest,
    Handler,
    JSONObject,
    JSONValue,
    RPCClient,
    RPCInvalidParams,
    ServerCaller,
    ServerHandler,
    UnaryCaller,
    UnaryHandler,
)
from ._address import NodeContact
from ._graph import DEFAULT_K, NodeGraph
from ._messages import (
    ActiveConnection,
    encode_active_connections,
    encode_node_contact,
    encode_node_id_message,
    parse_active_connection_message,
    parse_node_contact_message,
    parse_node_id_message,
)
from ._signalling import (
    SIGNAL_FINAL,
    SIGNAL_INITIAL,
    NodesConnectionSignalFinal,
    NodesConnectionSignalInitial,
    SignalHost,
    caller_node_id,
)

__all__ = [
    "CLOSEST_ACTIVE_CONNECTIONS",
    "CLOSEST_LOCAL_NODES",
    "PING",
    "NodesAgentAPI",
    "NodesClosestActiveConnectionsGet",
    "NodesClosestLocalNodesGet",
    "NodesPing",
    "node_handlers",
    "request_closest_active_connections",
    "request_closest_local_nodes",
    "request_ping",
]

log = logging.getLogger("polykey.nodes.handlers")

CLOSEST_LOCAL_NODES: Final = "nodesClosestLocalNodesGet"
CLOSEST_ACTIVE_CONNECTIONS: Final = "nodesClosestActiveConnectionsGet"
PING: Final = "nodesPing"


def _target(params: JSONValue) -> NodeId:
    node_id = parse_node_id_message(params)
    if node_id is None:
        raise RPCInvalidParams("nodeIdEncoded must be an encoded NodeId")
    return node_id


class NodesClosestLocalNodesGet(ServerHandler[NodeId, JSONObject]):
    """The closest nodes to the target in our graph."""

    def __init__(self, graph: NodeGraph, *, limit: int = DEFAULT_K) -> None:
        self.graph = graph
        self.limit = limit

    def parse_params(self, params: JSONValue) -> NodeId:
        return _target(params)

    async def handle(
        self, params: NodeId, ctx: CallContext
    ) -> AsyncIterator[JSONObject]:
        caller = caller_node_id(ctx)
        # Snapshot first: the graph may change while we are suspended in yield.
        contacts = [
            c
            for c in self.graph.closest(params, self.limit + 1, exclude_failed=True)
            if c.node_id != caller
        ][: self.limit]
        messages = [
            encode_node_contact(c, self.graph.last_seen(c.node_id)) for c in contacts
        ]
        for message in messages:
            yield message


class NodesClosestActiveConnectionsGet(ServerHandler[NodeId, JSONObject]):
    """The nodes we hold live connections to, closest to the target first."""

    def __init__(
        self,
        connections: Callable[[], Iterable[ActiveConnection]],
        *,
        limit: int = DEFAULT_K,
    ) -> None:
        self.connections = connections
        self.limit = limit

    def parse_params(self, params: JSONValue) -> NodeId:
        return _target(params)

    async def handle(
        self, params: NodeId, ctx: CallContext
    ) -> AsyncIterator[JSONObject]:
        by_node: dict[NodeId, list[ActiveConnection]] = {}
        for conn in self.connections():
            by_node.setdefault(conn.node_id, []).append(conn)
        t = params.to_int()
        closest = sorted(by_node, key=lambda n: n.to_int() ^ t)[: self.limit]
        messages = [encode_active_connections(n, by_node[n]) for n in closest]
        for message in messages:
            yield message


class NodesPing(UnaryHandler[JSONObject, JSONObject]):
    """Liveness: answers at once (our extension, see the module doc)."""

    def parse_params(self, params: JSONValue) -> JSONObject:
        if not isinstance(params, dict):
            raise RPCInvalidParams("nodesPing takes an object")
        return params

    async def handle(self, params: JSONObject, ctx: CallContext) -> JSONObject:
        result: JSONObject = {"type": "success", "success": True}
        host, port = ctx.transport.get("host"), ctx.transport.get("port")
        if isinstance(host, str) and isinstance(port, int):
            # Where we see the caller: its reflexive address.
            result["address"] = {"host": host, "port": port}
        return result


def node_handlers(
    graph: NodeGraph,
    *,
    active_connections: Callable[[], Iterable[ActiveConnection]] | None = None,
    signal_host: SignalHost | None = None,
    limit: int = DEFAULT_K,
) -> dict[str, Handler[Any, Any]]:
    """The manifest entries a node serves to other nodes.

    ``nodesClosestActiveConnectionsGet`` is served only with
    ``active_connections`` (a function listing the live connections), the
    two signalling methods only with ``signal_host``.
    """
    handlers: dict[str, Handler[Any, Any]] = {
        CLOSEST_LOCAL_NODES: NodesClosestLocalNodesGet(graph, limit=limit),
        PING: NodesPing(),
    }
    if active_connections is not None:
        handlers[CLOSEST_ACTIVE_CONNECTIONS] = NodesClosestActiveConnectionsGet(
            active_connections, limit=limit
        )
    if signal_host is not None:
        handlers[SIGNAL_INITIAL] = NodesConnectionSignalInitial(signal_host)
        handlers[SIGNAL_FINAL] = NodesConnectionSignalFinal(signal_host)
    return handlers


class NodesAgentAPI(ClientManifest):
    """Callers for the node-to-node methods (``RPCClient(NodesAgentAPI, ...)``)."""

    nodes_closest_local_nodes_get = ServerCaller[JSONObject, JSONObject](
        CLOSEST_LOCAL_NODES
    )
    nodes_closest_active_connections_get = ServerCaller[JSONObject, JSONObject](
        CLOSEST_ACTIVE_CONNECTIONS
    )
    nodes_ping = UnaryCaller[JSONObject, JSONObject](PING)


async def _collect(
    client: RPCClient[Any],
    method: str,
    target: NodeId,
    parse: Callable[[object], NodeContact | None],
    limit: int,
) -> list[NodeContact]:
    out: list[NodeContact] = []
    bad = 0
    seen = 0
    async with client.server_stream(method, encode_node_id_message(target)) as results:
        async for message in results:
            seen += 1
            contact = parse(message)
            if contact is None:
                bad += 1
            else:
                out.append(contact)
            if seen >= limit:
                # Leaving the block early resets the stream: the cap holds
                # whatever the peer meant to send.
                break
    if bad:
        log.debug("%s: %d malformed entries dropped", method, bad)
    return out


async def request_closest_local_nodes(
    client: RPCClient[Any], target: NodeId, *, limit: int = DEFAULT_K
) -> list[NodeContact]:
    """Call ``nodesClosestLocalNodesGet``; at most ``limit`` valid contacts."""
    return await _collect(
        client, CLOSEST_LOCAL_NODES, target, parse_node_contact_message, limit
    )


async def request_closest_active_connections(
    client: RPCClient[Any], target: NodeId, *, limit: int = DEFAULT_K
) -> list[NodeContact]:
    """Call ``nodesClosestActiveConnectionsGet``; contacts with the
    addresses of their live connections."""
    return await _collect(
        client,
        CLOSEST_ACTIVE_CONNECTIONS,
        target,
        parse_active_connection_message,
        limit,
    )


async def request_ping(client: RPCClient[Any]) -> bool:
    """Call ``nodesPing``; True when the peer says success."""
    result = await client.unary(PING, {})
    return isinstance(result, dict) and result.get("success") is True
