"""How the NodeManager talks to other nodes: the :class:`NodeTransport`.

The manager needs three things of the network, and nothing else: is this
node alive (:meth:`NodeTransport.ping`), which nodes does it know
closest to a target (:meth:`NodeTransport.closest_nodes`), and can a node
that connected to us be reached by a connection of our own
(:meth:`NodeTransport.dial_back`). Each is given
the NodeId (a transport that verifies identities, like QUIC, must refuse a
peer that is not that node) and its known addresses, most recent first.
A failure is any exception (or ``False`` from ``ping``); the manager bounds
every call with its own deadline, so a transport needs no timeouts.

:class:`ConnectionTransport` is the one implementation, for a node and its
simulations alike: the node RPC methods over a node's connections (the
:class:`~polykey.nodes.NodeConnectionManager`'s pooled QUIC connections, or
a simulated network's), and, as Polykey does, a node is alive if a verified
connection to it can be had.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from ..keys import NodeId
from ..quic import Address
from ._address import NodeAddress, NodeContact
from ._connections import NodeConnectionError
from ._failures import PEER_FAILURES
from ._graph import DEFAULT_K
from ._handlers import request_closest_local_nodes

__all__ = ["ConnectionTransport", "NodeTransport"]

log = logging.getLogger("polykey.nodes.transport")


class NodeTransport(Protocol):
    """What :class:`~polykey.nodes.NodeManager` needs of the network."""

    async def ping(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> bool:
        """True if ``node_id`` answered at one of ``addresses``."""
        ...

    async def closest_nodes(
        self, node_id: NodeId, addresses: Sequence[NodeAddress], target: NodeId
    ) -> Sequence[NodeContact]:
        """Ask ``node_id`` for the nodes it knows closest to ``target``
        (``nodesClosestLocalNodesGet``). Raise on failure."""
        ...

    async def dial_back(self, node_id: NodeId, address: NodeAddress) -> bool:
        """Reach ``node_id`` at ``address`` by a new connection of our own,
        whatever connections to it exist: the check that a node which
        connected to us can be reached there. False, untried, when an
        attempt to reach it is in flight already. Raise on failure."""
        ...


class _Pool(Protocol):
    """What :class:`ConnectionTransport` needs: the pool and a dial (the
    connection manager, or a simulated network's connections)."""

    def get(self, node_id: NodeId) -> Any: ...

    async def connect(self, node_id: NodeId, address: Address) -> Any: ...

    async def dial_back(self, node_id: NodeId, address: Address) -> bool: ...


class ConnectionTransport:
    """:class:`NodeTransport` over a node's connections: a pooled one, or a
    new one dialled at the node's known addresses in turn (the last
    failure is raised). One class for production (over the QUIC
    :class:`~polykey.nodes.NodeConnectionManager`) and for
    ``polykey.testing.NatNetwork`` (over its simulated links), so the
    simulation runs the liveness and lookup code that a node runs."""

    def __init__(self, connections: _Pool, *, limit: int = DEFAULT_K) -> None:
        self.connections = connections
        self.limit = limit
        #: Queries asked again on a new connection, their pooled one having
        #: ended under them.
        self.retried = 0

    async def connection(
        self, node_id: NodeId, addresses: Sequence[NodeAddress]
    ) -> Any:
        pooled = self.connections.get(node_id)
        if pooled is not None:
            return pooled
        return await self._dial(node_id, addresses)

    async def _dial(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> Any:
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.connections.connect(node_id, address.as_tuple())
            except PEER_FAILURES as exc:  # try the next; a bug propagates
                error = exc
        raise error or NodeConnectionError.unreachable(node_id)

    async def ping(self, node_id: NodeId, addresses: Sequence[NodeAddress]) -> bool:
        # A failure raises: the manager records why (and says so for seeds).
        await self.connection(node_id, addresses)
        return True

    async def dial_back(self, node_id: NodeId, address: NodeAddress) -> bool:
        # Never the pooled connection: that one is what is being checked.
        return await self.connections.dial_back(node_id, address.as_tuple())

    async def closest_nodes(
        self, node_id: NodeId, addresses: Sequence[NodeAddress], target: NodeId
    ) -> Sequence[NodeContact]:
        pooled = self.connections.get(node_id)
        if pooled is not None:
            try:
                return await request_closest_local_nodes(
                    pooled.rpc, target, limit=self.limit
                )
            except PEER_FAILURES:
                if self.connections.get(node_id) is pooled:
                    raise  # it lives: this is the peer's answer failing
                # It ended under the query: an idle close at either end can
                # cross a new call. Once more, on a connection dialled now.
                self.retried += 1
                log.debug(
                    "%s: its connection ended under a query; asking again", node_id
                )
        conn = await self._dial(node_id, addresses)
        return await request_closest_local_nodes(conn.rpc, target, limit=self.limit)
