"""Exceptions of the nodes layer (graph, lookups, node RPC).

Connection failures are reported by the transport (``_connections.py`` has
its own :class:`NodeConnectionError`); what lives here is about the node
graph, its on-disk store, addresses and lookups.
"""

from __future__ import annotations

from ..errors import PolykeyError

__all__ = [
    "InvalidAddressError",
    "NodeGraphCorruptError",
    "NodeGraphError",
    "NodeGraphForeignError",
    "NodeGraphStoreError",
    "NodeGraphVersionError",
    "NodeNotFoundError",
    "NodesError",
    "OwnNodeIdError",
]


class NodesError(PolykeyError):
    """Base class of the nodes layer's exceptions."""


class InvalidAddressError(NodesError, ValueError):
    """A node address is unusable: bad host, scoped IPv6, port out of range."""


class NodeGraphError(NodesError):
    """The node graph refused an operation."""


class OwnNodeIdError(NodeGraphError, ValueError):
    """A node's own NodeId cannot be a contact in its own graph."""


class NodeGraphStoreError(NodeGraphError):
    """The graph's SQLite file cannot be used; nothing in it was changed."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"node graph store {path}: {reason}")
        self.path = path
        self.reason = reason


class NodeGraphCorruptError(NodeGraphStoreError):
    """The file is not a readable SQLite database, or its rows are invalid."""


class NodeGraphForeignError(NodeGraphStoreError):
    """The file is a SQLite database, but not a polykey node graph (or it
    belongs to another NodeId)."""


class NodeGraphVersionError(NodeGraphStoreError):
    """The node graph was written by a newer, unknown schema version."""


class NodeNotFoundError(NodesError):
    """A lookup for a specific NodeId did not reach that node."""

    def __init__(self, node_id: object, detail: str = "") -> None:
        msg = f"node {node_id} not found"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.node_id = node_id
