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

The CLI reads the node's answers back through the same classes
(:func:`from_json`), strictly: a key missing or of the wrong JSON type is a
:class:`MalformedReply` naming the key, never a ``KeyError`` deep in the
printing code. Keys the classes do not know are ignored, so an older CLI
reads a newer node's answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .quic import Address

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
    "MalformedReply",
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
    "from_json",
    "read_ping",
    "to_json",
]

#: Field metadata: leave the key out while the value is None.
OPTIONAL: Final = {"omit_if_none": True}

JSON = dict[str, Any]
T = TypeVar("T")


class MalformedReply(ValueError):
    """A node's answer that does not have the shape its class says."""


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
    bugs: int


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
    addresses: list[Address]
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


def _renamed_structure(cls: type, conv: cattrs.Converter) -> Any:
    """The structure function of ``cls``, from camelCase keys."""
    return make_dict_structure_fn(
        cls,
        conv,
        **{f.name: override(rename=_camel(f.name)) for f in attrs.fields(cls)},  # type: ignore[arg-type]
    )


def _strict(kind: type, accepted: tuple[type, ...]) -> Callable[[Any, type], Any]:
    """A structure hook that checks the JSON type instead of converting
    (cattrs' default would make ``str(5)`` of a number)."""

    def structure(value: Any, _: type) -> Any:
        # bool is an int in Python, never in JSON.
        if isinstance(value, bool) is not (kind is bool) or not isinstance(
            value, accepted
        ):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    # JSON has arrays, not tuples: an address is [host, port].
    conv.register_unstructure_hook_func(
        lambda t: getattr(t, "__origin__", None) is tuple, list
    )
    conv.register_unstructure_hook_factory(
        attrs.has, lambda cls: _omitting_none(cls, conv)
    )
    conv.register_structure_hook_factory(
        attrs.has, lambda cls: _renamed_structure(cls, conv)
    )
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    return conv


_converter: Final = _make_converter()


def to_json(reply: object) -> JSON:
    """``reply`` (one of this module's classes) as the JSON object the CLI
    prints, with docs/cli.md's keys."""
    out = _converter.unstructure(reply)
    assert isinstance(out, dict)
    return out


def from_json(cls: type[T], data: object) -> T:
    """``data``, a node's answer, read as ``cls``; :class:`MalformedReply`
    names what is wrong with it."""
    if not isinstance(data, dict):
        raise MalformedReply(f"not a {cls.__name__}: not a JSON object")
    try:
        return _converter.structure(data, cls)
    except Exception as exc:  # cattrs' errors, as one line with the JSON keys
        why = "; ".join(cattrs.transform_error(exc, path=""))
        why = re.sub(r"\.([a-z_]+)", lambda m: "." + _camel(m[1]), why)
        raise MalformedReply(f"not a {cls.__name__}: {why}") from None


def read_ping(data: object) -> NodesPing | NodesPingFailed:
    """``nodesPingNode``'s answer, one of two shapes told apart by their
    ``success`` key (true or false, nothing else), read as :func:`from_json`
    reads either."""
    success = data.get("success") if isinstance(data, dict) else None
    if success is True:
        return from_json(NodesPing, data)
    if success is False:
        return from_json(NodesPingFailed, data)
    raise MalformedReply(
        "not a NodesPing or NodesPingFailed: success must be true or false"
    )
