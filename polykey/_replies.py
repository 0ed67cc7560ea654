"""The JSON the CLI prints, as attrs classes, converted by one cattrs
converter.

Each answer of a control method (``_control_methods``) and each object the
CLI writes itself (the start-up line, ``keys show``, a node not running) is
an attrs class here with Python field names; :func:`to_json` maps them to
the camelCase keys docs/cli.md lists (``node_id_encoded`` is
``nodeIdEncoded``), as nodes/_wire.py does for the node-to-node messages.
A field marked :data:`OPTIONAL` is left out while it is None (``attemptMs``
of a ping that found a pooled connection); every other None is a JSON null.
Counters that are a component's own snapshot (``statistics``, ``relay``)
stay plain mappings: their keys are the component's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

__all__ = [
    "AgentStatus",
    "AgentStop",
    "Certificate",
    "ConnectionEntry",
    "ControlCounts",
    "GraphEntry",
    "HostPort",
    "KeysRenew",
    "KeysShow",
    "LookupEntry",
    "LookupProgress",
    "NodeLink",
    "NodeNotRunning",
    "NodesAdd",
    "NodesConnections",
    "NodesFind",
    "NodesGetAll",
    "NodesPing",
    "NodesPingFailed",
    "ServedCounts",
    "Started",
    "to_json",
]

#: Field metadata: leave the key out while the value is None.
OPTIONAL: Final = {"omit_if_none": True}

JSON = dict[str, Any]


@attrs.frozen
class HostPort:
    host: str
    port: int


@attrs.frozen
class NodeLink:
    """A live connection, as ``agent status`` lists it."""

    node_id_encoded: str
    host: str
    port: int
    path: str
    outgoing: bool


@attrs.frozen
class ServedCounts:
    rpc_calls: int
    lookups: int
    finds: int


@attrs.frozen
class ControlCounts:
    clients: int
    accepted: int
    refused_busy: int
    accept_errors: int
    timeouts: int


@attrs.frozen(kw_only=True)
class AgentStatus:
    status: str
    pid: int
    version: str
    node_id_encoded: str
    host: str
    port: int
    start_time: str
    up_time: float
    connections_active: int
    nodes_total: int
    graph_size: int  # the old name of nodes_total
    connections: list[NodeLink]
    reflexive: list[HostPort]
    behind_nat: bool
    relay: JSON
    served: ServedCounts
    statistics: JSON
    control: ControlCounts


@attrs.frozen(kw_only=True)
class NodeNotRunning:
    """``agent status`` / ``agent stop`` when no node answers."""

    status: str = "DEAD"
    state_dir: str


@attrs.frozen
class AgentStop:
    status: str
    pid: int


@attrs.frozen(kw_only=True)
class NodesAdd:
    node_id_encoded: str
    host: str
    port: int
    added: bool
    pinged: bool | None


@attrs.frozen(kw_only=True)
class NodesFind:
    node_id_encoded: str
    addresses: list[tuple[str, int]]
    rounds: int
    found_round: int | None
    queries: int
    failures: int


@attrs.frozen(kw_only=True)
class NodesPing:
    node_id_encoded: str
    success: bool = True
    path: str
    host: str
    port: int
    pooled: bool
    connect_ms: float
    rtt_ms: float
    attempt_ms: float | None = attrs.field(default=None, metadata=OPTIONAL)


@attrs.frozen(kw_only=True)
class NodesPingFailed:
    node_id_encoded: str
    success: bool = False
    error: str


@attrs.frozen(kw_only=True)
class GraphEntry:
    node_id_encoded: str
    bucket_index: int
    addresses: list[HostPort]
    last_seen: str | None


@attrs.frozen
class NodesGetAll:
    nodes: list[GraphEntry]


@attrs.frozen(kw_only=True)
class ConnectionEntry:
    node_id_encoded: str
    host: str
    port: int
    path: str
    outgoing: bool
    age_s: float
    ttl_left_s: float | None
    streams: int
    bytes_sent: int
    bytes_received: int
    rtt_ms: float | None


@attrs.frozen
class NodesConnections:
    connections: list[ConnectionEntry]


@attrs.frozen(kw_only=True)
class LookupEntry:
    target_node_id_encoded: str
    rounds: int
    contacted: int
    in_flight: int
    responses: int
    failures: int


@attrs.frozen
class LookupProgress:
    lookups: list[LookupEntry]


@attrs.frozen(kw_only=True)
class Started:
    """The start-up line of ``polykey node --format json``."""

    node_id_encoded: str
    host: str
    port: int
    seed: str
    state_dir: str
    control_socket: str
    pid: int
    metrics: str | None
    note: str | None


@attrs.frozen
class Certificate:
    node_id_encoded: str
    not_before: str
    not_after: str


@attrs.frozen(kw_only=True)
class KeysShow:
    node_id_encoded: str
    key_file: str
    chain_valid: bool
    chain_error: str | None
    certificates: list[Certificate]


@attrs.frozen(kw_only=True)
class KeysRenew:
    previous_node_id_encoded: str
    node_id_encoded: str
    certificates: list[Certificate]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _omitting_none(cls: type, conv: cattrs.Converter) -> Any:
    """The unstructure function of ``cls``: camelCase keys, and the
    :data:`OPTIONAL` fields left out while None."""
    fields = attrs.fields(cls)
    plain: Callable[[Any], JSON] = make_dict_unstructure_fn(
        cls,
        conv,
        **{f.name: override(rename=_camel(f.name)) for f in fields},  # type: ignore[arg-type]
    )
    optional = [
        (f.name, _camel(f.name)) for f in fields if f.metadata.get("omit_if_none")
    ]
    if not optional:
        return plain

    def unstructure(value: Any) -> JSON:
        out: JSON = plain(value)
        for name, key in optional:
            if getattr(value, name) is None:
                del out[key]
        return out

    return unstructure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    # JSON has arrays, not tuples: an address is [host, port].
    conv.register_unstructure_hook_func(
        lambda t: getattr(t, "__origin__", None) is tuple, list
    )
    conv.register_unstructure_hook_factory(
        attrs.has, lambda cls: _omitting_none(cls, conv)
    )
    return conv


_converter: Final = _make_converter()


def to_json(reply: object) -> JSON:
    """``reply`` (one of this module's classes) as the JSON object the CLI
    prints, with docs/cli.md's keys."""
    out = _converter.unstructure(reply)
    assert isinstance(out, dict)
    return out
