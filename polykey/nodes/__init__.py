"""polykey.nodes: the Kademlia node graph, lookups and node connections.

See docs/nodes.md. These names are the public API.
"""

from __future__ import annotations

from ._address import (
    MAX_ADDRESSES,
    NodeAddress,
    NodeContact,
    format_contact_address,
    format_host_port,
    parse_address,
    parse_contact_address,
    parse_host_port,
)
from ._connections import (
    ConnectionPath,
    NodeConnection,
    NodeConnectionError,
    NodeConnectionManager,
)
from ._errors import (
    InvalidAddressError,
    NodeGraphCorruptError,
    NodeGraphError,
    NodeGraphForeignError,
    NodeGraphStoreError,
    NodeGraphVersionError,
    NodeNotFoundError,
    NodesError,
    OwnNodeIdError,
)
from ._finder import FinderStatistics, NodeFinder
from ._graph import (
    BUCKET_COUNT,
    DEFAULT_K,
    PING_BATCH,
    AddResult,
    NodeGraph,
    random_node_id_in_bucket,
)
from ._handlers import (
    CLOSEST_ACTIVE_CONNECTIONS,
    CLOSEST_LOCAL_NODES,
    PING,
    NodesAgentAPI,
    NodesClosestActiveConnectionsGet,
    NodesClosestLocalNodesGet,
    NodesPing,
    node_handlers,
    request_closest_active_connections,
    request_closest_local_nodes,
    request_ping,
)
from ._lookup import DEFAULT_ALPHA, DEFAULT_MAX_CONTACTED, Lookup
from ._manager import (
    JoinResult,
    LookupResult,
    NodeManager,
    NodeManagerConfig,
    NodeManagerStatistics,
)
from ._messages import (
    ActiveConnection,
    encode_node_contact,
    parse_active_connection_message,
    parse_node_contact_message,
)
from ._refresh import RefreshSchedule
from ._signalling import (
    SIGNAL_FINAL,
    SIGNAL_INITIAL,
    NodesConnectionSignalFinal,
    NodesConnectionSignalInitial,
    SignalError,
    request_signal,
)
from ._transport import (
    ConnectFunction,
    ConnectionTransport,
    NodeTransport,
    QUICNodeTransport,
    RPCNodeTransport,
)
from ._writer import GraphWriter

__all__ = [
    "BUCKET_COUNT",
    "CLOSEST_ACTIVE_CONNECTIONS",
    "CLOSEST_LOCAL_NODES",
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "DEFAULT_MAX_CONTACTED",
    "MAX_ADDRESSES",
    "PING",
    "PING_BATCH",
    "SIGNAL_FINAL",
    "SIGNAL_INITIAL",
    "ActiveConnection",
    "AddResult",
    "ConnectFunction",
    "ConnectionPath",
    "ConnectionTransport",
    "FinderStatistics",
    "GraphWriter",
    "InvalidAddressError",
    "JoinResult",
    "Lookup",
    "LookupResult",
    "NodeAddress",
    "NodeConnection",
    "NodeConnectionError",
    "NodeConnectionManager",
    "NodeContact",
    "NodeFinder",
    "NodeGraph",
    "NodeGraphCorruptError",
    "NodeGraphError",
    "NodeGraphForeignError",
    "NodeGraphStoreError",
    "NodeGraphVersionError",
    "NodeManager",
    "NodeManagerConfig",
    "NodeManagerStatistics",
    "NodeNotFoundError",
    "NodeTransport",
    "NodesAgentAPI",
    "NodesClosestActiveConnectionsGet",
    "NodesClosestLocalNodesGet",
    "NodesConnectionSignalFinal",
    "NodesConnectionSignalInitial",
    "NodesError",
    "NodesPing",
    "OwnNodeIdError",
    "QUICNodeTransport",
    "RPCNodeTransport",
    "RefreshSchedule",
    "SignalError",
    "encode_node_contact",
    "format_contact_address",
    "format_host_port",
    "node_handlers",
    "parse_active_connection_message",
    "parse_address",
    "parse_contact_address",
    "parse_host_port",
    "parse_node_contact_message",
    "random_node_id_in_bucket",
    "request_closest_active_connections",
    "request_closest_local_nodes",
    "request_ping",
    "request_signal",
]
