"""The node-to-node JSON shapes as attrs classes, converted by one cattrs
converter.

Each shape a peer sends us is an attrs class here with Python field names;
:data:`converter` maps them to Polykey's camelCase keys (``node_id`` is
``nodeIdEncoded``) and validates while it structures: a NodeId must decode,
an address must be dialable (:class:`NodeAddress`), a signature must be 64
bytes of base64url. What fails is a :class:`WireError` naming the key, in
our own words (never cattrs' or Python's text), so a handler can answer
-32602 with it and a reader of a peer's reply can skip that entry.

An address a peer names as ``{"host", "port"}`` (a signaller's answer and
the address it signs, where a ``nodesPing`` saw us) structures straight to
a :class:`NodeAddress`; a relay's answers to our reservation and circuit
requests are :class:`RelayReserveAnswer` and :class:`RelayConnectAnswer`
(which the relay's handlers unstructure too).
Inside a nested shape the error names the path (``address.port``), and
:func:`structure` can name the value itself (``at="answer"``).

Two things the shapes cannot say are done around the converter, not in it:
a contact's address entries are structured one by one (one bad entry costs
that entry, not the contact), and at most ``limit`` of them are looked at;
and a signal's ``address`` stays the peer's own mapping, because the relay
signature covers its JSON in the peer's key order.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Final, NewType, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ..keys import NodeId, NodeIdError
from ._address import NodeAddress
from ._errors import InvalidAddressError

__all__ = [
    "CIRCUIT_ID_LEN",
    "ActiveConnectionData",
    "CircuitId",
    "ConnectionInfo",
    "ContactInfo",
    "Count",
    "HostPort",
    "JSONMapping",
    "Millis",
    "NodeContactData",
    "NodeIdParams",
    "PacketSize",
    "PingAnswer",
    "Port",
    "RelayConnectAnswer",
    "RelayConnectParams",
    "RelayReserveAnswer",
    "RelayStopParams",
    "SignalFinalParams",
    "SignalInitialParams",
    "Signature",
    "WireError",
    "address_of",
    "b64url_decode",
    "b64url_encode",
    "converter",
    "structure",
]

#: A signature as Polykey sends it: 64 bytes of Ed25519, base64url.
Signature = NewType("Signature", bytes)
#: A JSON object kept as the peer sent it (key order included).
JSONMapping = NewType("JSONMapping", dict)  # type: ignore[type-arg]
#: A relay circuit's id on one of its connections, base64url on the wire.
CircuitId = NewType("CircuitId", bytes)

#: A UDP port, 1..65535.
Port = NewType("Port", int)
#: A positive count of milliseconds, within JavaScript's safe integers (a
#: peer's 10**400 would overflow the float of seconds it becomes).
Millis = NewType("Millis", int)
#: A UDP payload size in bytes, 1..65535.
PacketSize = NewType("PacketSize", int)
#: A count (of bytes), 0..2**53 - 1.
Count = NewType("Count", int)

#: Bytes in a circuit id (prefixed to every relayed datagram).
CIRCUIT_ID_LEN: Final = 8
_MAX_SAFE_INT: Final = 2**53 - 1

_SIGNATURE_LEN: Final = 64
_MAX_B64: Final = 128  # a signature is 86 characters; much longer is not one
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")

T = TypeVar("T")


class WireError(ValueError):
    """A message that is not the shape it should be; ``str()`` names the key,
    and ``key`` is it, a dotted path into nested shapes (None when the
    message as a whole is wrong). Raised by a hook, ``key`` may name a key
    below the value the hook was given (``host`` of an address);
    :func:`structure` makes it the whole path."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as Polykey sends signatures."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object) -> bytes:
    """Strict inverse of :func:`b64url_encode` (padding tolerated); raises
    ValueError on anything else."""
    if not isinstance(text, str) or len(text) > _MAX_B64 or not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    body = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise ValueError("not base64url") from None


# -- the shapes ------------------------------------------------------------------------


@attrs.frozen
class NodeIdParams:
    """``NodeIdMessage``: ``{"nodeIdEncoded": NodeIdEncoded}``."""

    node_id: NodeId


@attrs.frozen
class ContactInfo:
    """One address entry of a ``NodeContact`` (the address is its key)."""

    mode: str = "direct"
    connected_time: float = 0.0  # ms since the epoch, 0 if never
    scopes: tuple[str, ...] = ("global",)


@attrs.frozen
class NodeContactData:
    """``NodeContactMessage``: a NodeId and its address entries, by
    ``"host-port"`` key (structured one by one, see the module doc)."""

    node_id: NodeId
    node_contact: JSONMapping


@attrs.frozen
class ConnectionInfo:
    """One entry of an ``ActiveConnectionDataMessage``."""

    host: str
    port: int
    host_name: str | None = None
    timeout: float | None = None  # ms until the connection's TTL ends
    primary: bool = True


@attrs.frozen
class ActiveConnectionData:
    """``ActiveConnectionDataMessage``: a NodeId and its live connections."""

    node_id: NodeId
    connections: JSONMapping


@attrs.frozen
class SignalInitialParams:
    """``nodesConnectionSignalInitial``'s params (the requester is the caller)."""

    target: NodeId
    signature: Signature


@attrs.frozen
class SignalFinalParams:
    """``nodesConnectionSignalFinal``'s params, as the signaller forwards them."""

    source: NodeId
    target: NodeId
    address: JSONMapping
    request_signature: Signature
    relay_signature: Signature


@attrs.frozen
class RelayConnectParams:
    """``nodesRelayConnect``'s params (a circuit to ``target``)."""

    target: NodeId


@attrs.frozen
class RelayStopParams:
    """``nodesRelayStop``'s params: the relay opens ``circuit`` from
    ``source`` to us."""

    source: NodeId
    circuit: CircuitId


@attrs.frozen
class HostPort:
    """``{"host", "port"}`` as a peer names an address; the converter
    makes a :class:`NodeAddress` of it (structure to that)."""

    host: str
    port: Port


@attrs.frozen
class PingAnswer:
    """``nodesPing``'s answer (our extension): where the peer sees us, if
    it says (``success`` is what :func:`request_ping` reads)."""

    address: NodeAddress | None = None


@attrs.frozen
class RelayReserveAnswer:
    """``nodesRelayReserve``'s answer: how long the reservation lasts."""

    expires_ms: Millis


@attrs.frozen
class RelayConnectAnswer:
    """``nodesRelayConnect``'s answer: our end's circuit id, the circuit's
    limits (for information: the relay enforces them) and the largest
    inner packet the relay carries, if it names one (left out while None)."""

    circuit: CircuitId
    duration_ms: Millis | None = None
    bytes: Count | None = None
    max_packet: PacketSize | None = None


# Python name -> wire key, where the two differ by more than camelCase.
_RENAMES: Final[dict[type, dict[str, str]]] = {
    NodeIdParams: {"node_id": "nodeIdEncoded"},
    NodeContactData: {"node_id": "nodeIdEncoded"},
    ActiveConnectionData: {"node_id": "nodeId"},
    ConnectionInfo: {"host_name": "hostName"},
    SignalInitialParams: {"target": "targetNodeIdEncoded"},
    SignalFinalParams: {
        "source": "sourceNodeIdEncoded",
        "target": "targetNodeIdEncoded",
    },
    RelayConnectParams: {"target": "targetNodeIdEncoded"},
    RelayStopParams: {"source": "sourceNodeIdEncoded"},
}


# Fields left out of the JSON while None (the others are written as null).
_OMITTED_IF_NONE: Final[dict[type, frozenset[str]]] = {
    RelayConnectAnswer: frozenset({"max_packet"}),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# -- the converter ---------------------------------------------------------------------


def _node_id(value: object, _: object) -> NodeId:
    if isinstance(value, str):
        try:
            return NodeId.from_string(value)
        except NodeIdError:
            pass
    raise WireError("must be an encoded NodeId")


def _signature(value: object, _: object) -> Signature:
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise WireError("must be a base64url signature") from None
    if len(raw) != _SIGNATURE_LEN:
        raise WireError(f"must be a {_SIGNATURE_LEN}-byte signature")
    return Signature(raw)


def _circuit_id(value: object, _: object) -> CircuitId:
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise WireError("must be base64url") from None
    if len(raw) != CIRCUIT_ID_LEN:
        raise WireError(f"must be {CIRCUIT_ID_LEN} bytes")
    return CircuitId(raw)


def _bounded(low: int, high: int, what: str) -> Any:
    # A range check before anything uses the number: JSON integers are
    # unbounded, and the text of a huge one is no use in an error.
    def hook(value: object, _: object) -> int:
        if type(value) is not int or not low <= value <= high:
            raise WireError(f"must be {what}")
        return value

    return hook


def _mapping(value: object, _: object) -> JSONMapping:
    if not isinstance(value, dict):
        raise WireError("must be an object")
    return JSONMapping(value)


def _exact(kind: type, what: str) -> Any:
    # JSON has no int/float/bool coercions: true is not 1, "1" is not 1.
    def hook(value: object, _: object) -> object:
        if type(value) is bool and kind is not bool:
            raise WireError(f"must be {what}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise WireError(f"must be {what}")
        return value

    return hook


def _strings(value: object, _: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WireError("must be a list of strings")
    return tuple(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True)
    conv.register_structure_hook(NodeId, _node_id)
    conv.register_unstructure_hook(NodeId, str)
    conv.register_structure_hook(Signature, _signature)
    conv.register_unstructure_hook(Signature, b64url_encode)
    conv.register_structure_hook(CircuitId, _circuit_id)
    conv.register_unstructure_hook(CircuitId, b64url_encode)
    conv.register_structure_hook(JSONMapping, _mapping)
    conv.register_structure_hook(str, _exact(str, "a string"))
    conv.register_structure_hook(int, _exact(int, "an integer"))
    conv.register_structure_hook(float, _exact(float, "a number"))
    conv.register_structure_hook(bool, _exact(bool, "true or false"))
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _strings)
    conv.register_structure_hook(Port, _bounded(1, 65535, "a port number (1-65535)"))
    conv.register_structure_hook(
        Millis, _bounded(1, _MAX_SAFE_INT, "a positive integer of at most 2**53 - 1")
    )
    conv.register_structure_hook(
        PacketSize, _bounded(1, 65535, "a packet size (1-65535)")
    )
    conv.register_structure_hook(
        Count, _bounded(0, _MAX_SAFE_INT, "an integer from 0 to 2**53 - 1")
    )

    def node_address(value: object, _: object) -> NodeAddress:
        if not isinstance(value, dict):
            raise WireError("must be an object")
        where = conv.structure(value, HostPort)
        try:
            return NodeAddress(where.host, where.port)
        except InvalidAddressError as exc:
            # The port passed its hook: what is left to refuse is the host.
            raise WireError(f"is not dialable: {exc}", "host") from None

    conv.register_structure_hook(NodeAddress, node_address)
    conv.register_unstructure_hook(
        NodeAddress, lambda a: {"host": a.host, "port": a.port}
    )
    for cls in (
        NodeIdParams,
        ContactInfo,
        NodeContactData,
        ConnectionInfo,
        ActiveConnectionData,
        SignalInitialParams,
        SignalFinalParams,
        RelayConnectParams,
        RelayStopParams,
        HostPort,
        PingAnswer,
        RelayReserveAnswer,
        RelayConnectAnswer,
    ):
        renames = _RENAMES.get(cls, {})
        omitted = _OMITTED_IF_NONE.get(cls, frozenset())
        overrides = {
            f.name: override(
                rename=renames.get(f.name, _camel(f.name)),
                omit_if_default=f.name in omitted,
            )
            for f in attrs.fields(cls)
        }
        conv.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, conv, **overrides),  # type: ignore[arg-type]
        )
        conv.register_unstructure_hook(
            cls,
            make_dict_unstructure_fn(cls, conv, **overrides),  # type: ignore[arg-type]
        )
    return conv


#: The one converter of the nodes layer's wire shapes.
converter: Final = _make_converter()


def _wire_key(cls: type, field: str) -> str:
    return _RENAMES.get(cls, {}).get(field, _camel(field))


def _join(path: str | None, key: str | None) -> str | None:
    if not path:
        return key
    return f"{path}.{key}" if key else path


def _first_error(exc: BaseException, path: str | None) -> WireError:
    """Our own words for why structuring failed: the wire key (a dotted path
    into nested shapes, below ``path``), and what it must be."""
    if isinstance(exc, cattrs.ClassValidationError):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            field = next(
                (
                    n.name
                    for n in notes
                    if isinstance(n, cattrs.AttributeValidationNote)
                ),
                None,
            )
            key = _join(path, _wire_key(exc.cl, field) if field else None)
            if isinstance(sub, cattrs.ClassValidationError):
                return _first_error(sub, key)
            shown = key or "params"
            if isinstance(sub, KeyError):
                return WireError(f"{shown} is missing", key)
            if isinstance(sub, WireError):
                inner = _join(key, sub.key)
                return WireError(f"{inner or 'params'} {sub}", inner)
            return WireError(f"{shown} is not valid", key)
    if isinstance(exc, WireError):
        inner = _join(path, exc.key)
        return WireError(f"{inner or 'params'} {exc}", inner)
    return WireError(f"{path or 'params'} is not valid", path)


def structure(value: object, cls: type[T], *, at: str | None = None) -> T:
    """``value`` (parsed JSON) as ``cls``; raises :class:`WireError`, whose
    key is a path from ``at`` (the value's own name, "params" if None)."""
    if not isinstance(value, dict):
        raise WireError(f"{at or 'params'} must be an object", at)
    try:
        return converter.structure(value, cls)
    except (cattrs.BaseValidationError, WireError) as exc:
        raise _first_error(exc, at) from None


def address_of(info: ConnectionInfo) -> NodeAddress:
    """The dialable address of a connection entry; raises InvalidAddressError."""
    return NodeAddress(info.host, info.port)
