"""The JSON shapes of the node-to-node RPC methods, encoded and checked.

Shapes follow Polykey's agent types (src/nodes/agent/types.ts):

* ``NodeIdMessage``: ``{"nodeIdEncoded": NodeIdEncoded}``
* ``NodeContactMessage``: ``{"nodeIdEncoded": ..., "nodeContact": {"host-port":
  {"mode": "direct", "connectedTime": ms, "scopes": ["global"]}, ...}}``
* ``ActiveConnectionDataMessage``: ``{"nodeId": ..., "connections": {id:
  {"host", "hostName", "port", "timeout", "primary"}}}``
* ``SuccessMessage`` (our ``nodesPing``): ``{"type": "success", "success": true}``

The shapes are attrs classes converted by cattrs (``_wire``). Parsers
never raise on a peer's nonsense: they return ``None`` (one bad
entry) and the caller counts it. At most :data:`MAX_ADDRESS_KEYS` address
entries of one contact are examined and :data:`MAX_ADDRESSES` kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import attrs

from ..keys import NodeId
from ..rpc import JSONObject
from ._address import (
    MAX_ADDRESSES,
    NodeAddress,
    NodeContact,
    format_contact_address,
    parse_contact_address,
)
from ._errors import InvalidAddressError
from ._wire import (
    ActiveConnectionData,
    ConnectionInfo,
    ContactInfo,
    JSONMapping,
    NodeContactData,
    NodeIdParams,
    WireError,
    address_of,
    converter,
    structure,
)

__all__ = [
    "MAX_ADDRESS_KEYS",
    "ActiveConnection",
    "encode_active_connections",
    "encode_node_contact",
    "encode_node_contact_structured",
    "encode_node_id_message",
    "parse_active_connection_message",
    "parse_node_contact_message",
    "parse_node_id",
    "parse_node_id_message",
]

#: Address entries of one contact looked at before giving up on the rest.
MAX_ADDRESS_KEYS: Final = 16


@attrs.frozen
class ActiveConnection:
    """One live connection, as ``nodesClosestActiveConnectionsGet`` reports it.

    ``timeout``: milliseconds until the connection's TTL ends, if known.
    """

    node_id: NodeId
    address: NodeAddress
    connection_id: str = ""
    hostname: str | None = None
    timeout: float | None = None
    primary: bool = True


def parse_node_id(value: object) -> NodeId | None:
    try:
        return converter.structure(value, NodeId)
    except WireError:
        return None


def encode_node_id_message(node_id: NodeId) -> JSONObject:
    return converter.unstructure(NodeIdParams(node_id))  # type: ignore[no-any-return]


def parse_node_id_message(params: object) -> NodeId | None:
    try:
        return structure(params, NodeIdParams).node_id
    except WireError:
        return None


def _connected_ms(connected_time: float | None) -> int:
    # Checked after scaling: a huge time overflows to infinity only then.
    ms = connected_time * 1000 if connected_time else 0.0
    return max(int(ms), 0) if math.isfinite(ms) else 0


def encode_node_contact(
    contact: NodeContact, connected_time: float | None
) -> JSONObject:
    """A ``NodeContactMessage`` for ``contact``, last seen at
    ``connected_time`` (seconds, as the graph records it; ``None`` if never)."""
    # Written out rather than through cattrs: every lookup answer encodes
    # 20 of these; per answer 217 us against cattrs' 357 with ids new to
    # the node (bench/node_messages.py), about 55 against 355 with ids
    # encoded before. tests/nodes/test_wire.py asserts it equals the cattrs
    # encoding, encode_node_contact_structured.
    ms = _connected_ms(connected_time)
    return {
        "nodeIdEncoded": contact.node_id.encode(),
        "nodeContact": {
            format_contact_address(a): {
                "mode": "direct",
                "connectedTime": ms,
                "scopes": ["global"],
            }
            for a in contact.addresses
        },
    }


def encode_node_contact_structured(
    contact: NodeContact, connected_time: float | None
) -> JSONObject:
    """:func:`encode_node_contact` through the attrs shapes and cattrs: the
    definition the fast one is tested against."""
    info = converter.unstructure(
        ContactInfo(connected_time=_connected_ms(connected_time))
    )
    entries = {format_contact_address(a): info for a in contact.addresses}
    message = NodeContactData(contact.node_id, JSONMapping(entries))
    return converter.unstructure(message)  # type: ignore[no-any-return]


def _direct(data: object) -> bool:
    # Only direct addresses can be dialled (Polykey's findNodeByDirect).
    try:
        return structure(data, ContactInfo).mode == "direct"
    except WireError:
        return False


def parse_node_contact_message(message: object) -> NodeContact | None:
    """A contact from a ``NodeContactMessage``; None if unusable."""
    try:
        data = structure(message, NodeContactData)
    except WireError:
        return None
    out: list[NodeAddress] = []
    for count, (key, info) in enumerate(data.node_contact.items()):
        if count >= MAX_ADDRESS_KEYS or len(out) >= MAX_ADDRESSES:
            break
        if not _direct(info):
            continue
        try:
            address = parse_contact_address(key)
        except InvalidAddressError:
            continue
        if address not in out:
            out.append(address)
    if not out:
        return None
    return NodeContact(data.node_id, out)


def encode_active_connections(
    node_id: NodeId, connections: Iterable[ActiveConnection]
) -> JSONObject:
    entries = {
        conn.connection_id or f"{index}": converter.unstructure(
            ConnectionInfo(
                host=conn.address.host,
                port=conn.address.port,
                host_name=conn.hostname,
                timeout=conn.timeout,
                primary=conn.primary,
            )
        )
        for index, conn in enumerate(connections)
    }
    message = ActiveConnectionData(node_id, JSONMapping(entries))
    return converter.unstructure(message)  # type: ignore[no-any-return]


def parse_active_connection_message(message: object) -> NodeContact | None:
    """A contact from an ``ActiveConnectionDataMessage``; None if unusable."""
    try:
        data = structure(message, ActiveConnectionData)
    except WireError:
        return None
    out: list[NodeAddress] = []
    for count, entry in enumerate(data.connections.values()):
        if count >= MAX_ADDRESS_KEYS or len(out) >= MAX_ADDRESSES:
            break
        try:
            address = address_of(structure(entry, ConnectionInfo))
        except (WireError, InvalidAddressError):
            continue
        if address not in out:
            out.append(address)
    if not out:
        return None
    return NodeContact(data.node_id, out)
