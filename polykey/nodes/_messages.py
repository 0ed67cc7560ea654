"""The JSON shapes of the node-to-node RPC methods, encoded and checked.

Shapes follow Polykey's agent types (src/nodes/agent/types.ts):

* ``NodeIdMessage``: ``{"nodeIdEncoded": NodeIdEncoded}``
* ``NodeContactMessage``: ``{"nodeIdEncoded": ..., "nodeContact": {"host-port":
  {"mode": "direct", "connectedTime": ms, "scopes": ["global"]}, ...}}``
* ``ActiveConnectionDataMessage``: ``{"nodeId": ..., "connections": {id:
  {"host", "hostName", "port", "timeout", "primary"}}}``
* ``SuccessMessage`` (our ``nodesPing``): ``{"type": "success", "success": true}``

Parsers never raise on a peer's nonsense: they return ``None`` (one bad
entry) and the caller counts it. At most :data:`MAX_ADDRESS_KEYS` address
entries of one contact are examined and :data:`MAX_ADDRESSES` kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from ..keys import NodeId
from ..keys.errors import NodeIdError
from ..rpc import JSONObject
from ._address import (
    MAX_ADDRESSES,
    NodeAddress,
    NodeContact,
    format_contact_address,
    parse_contact_address,
)
from .errors import InvalidAddressError

__all__ = [
    "MAX_ADDRESS_KEYS",
    "ActiveConnection",
    "encode_active_connections",
    "encode_node_contact",
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
    if not isinstance(value, str):
        return None
    try:
        return NodeId.from_string(value)
    except NodeIdError:
        return None


def encode_node_id_message(node_id: NodeId) -> JSONObject:
    return {"nodeIdEncoded": node_id.encode()}


def parse_node_id_message(params: object) -> NodeId | None:
    if not isinstance(params, Mapping):
        return None
    return parse_node_id(params.get("nodeIdEncoded"))


def encode_node_contact(
    contact: NodeContact, connected_time: float | None
) -> JSONObject:
    ms = (
        int(connected_time * 1000)
        if connected_time and math.isfinite(connected_time)
        else 0
    )
    data: dict[str, Any] = {
        format_contact_address(address): {
            "mode": "direct",
            "connectedTime": max(ms, 0),
            "scopes": ["global"],
        }
        for address in contact.addresses
    }
    return {"nodeIdEncoded": contact.node_id.encode(), "nodeContact": data}


def _addresses(keys: Iterable[object]) -> list[NodeAddress]:
    out: list[NodeAddress] = []
    for count, key in enumerate(keys):
        if count >= MAX_ADDRESS_KEYS or len(out) >= MAX_ADDRESSES:
            break
        try:
            address = parse_contact_address(key)
        except InvalidAddressError:
            continue
        if address not in out:
            out.append(address)
    return out


def parse_node_contact_message(message: object) -> NodeContact | None:
    """A contact from a ``NodeContactMessage``; None if unusable."""
    if not isinstance(message, Mapping):
        return None
    node_id = parse_node_id(message.get("nodeIdEncoded"))
    contact = message.get("nodeContact")
    if node_id is None or not isinstance(contact, Mapping):
        return None
    keys = [
        key
        for key, data in list(contact.items())[:MAX_ADDRESS_KEYS]
        # Only direct addresses can be dialled (Polykey's findNodeByDirect).
        if isinstance(data, Mapping) and data.get("mode", "direct") == "direct"
    ]
    addresses = _addresses(keys)
    if not addresses:
        return None
    return NodeContact(node_id, addresses)


def encode_active_connections(
    node_id: NodeId, connections: Iterable[ActiveConnection]
) -> JSONObject:
    data: dict[str, Any] = {}
    for index, conn in enumerate(connections):
        key = conn.connection_id or f"{index}"
        data[key] = {
            "host": conn.address.host,
            "hostName": conn.hostname,
            "port": conn.address.port,
            "timeout": conn.timeout,
            "primary": conn.primary,
        }
    return {"nodeId": node_id.encode(), "connections": data}


def parse_active_connection_message(message: object) -> NodeContact | None:
    """A contact from an ``ActiveConnectionDataMessage``; None if unusable."""
    if not isinstance(message, Mapping):
        return None
    node_id = parse_node_id(message.get("nodeId"))
    connections = message.get("connections")
    if node_id is None or not isinstance(connections, Mapping):
        return None
    out: list[NodeAddress] = []
    for count, data in enumerate(connections.values()):
        if count >= MAX_ADDRESS_KEYS or len(out) >= MAX_ADDRESSES:
            break
        if not isinstance(data, Mapping):
            continue
        try:
            address = NodeAddress(data.get("host"), data.get("port"))
        except (InvalidAddressError, TypeError):
            continue
        if address not in out:
            out.append(address)
    if not out:
        return None
    return NodeContact(node_id, out)
