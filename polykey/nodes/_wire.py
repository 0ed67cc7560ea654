"""The node-to-node JSON shapes as attrs classes, converted by one cattrs
converter.

Each shape a peer sends us is an attrs class here with Python field names;
:data:`converter` maps them to Polykey's camelCase keys (``node_id`` is
``nodeIdEncoded``) and validates while it structures: a NodeId must decode,
an address must be dialable (:class:`NodeAddress`), a signature must be 64
bytes of base64url. What fails is a :class:`WireError` naming the key, in
our own words (never cattrs' or Python's text), so a handler can answer
-32602 with it and a reader of a peer's reply can skip that entry.

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

__all__ = [
    "CIRCUIT_ID_LEN",
    "ActiveConnectionData",
    "CircuitId",
    "ConnectionInfo",
    "ContactInfo",
    "JSONMapping",
    "NodeContactData",
    "NodeIdParams",
    "RelayConnectParams",
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

#: Bytes in a circuit id (prefixed to every relayed datagram).
CIRCUIT_ID_LEN: Final = 8

_SIGNATURE_LEN: Final = 64
_MAX_B64: Final = 128  # a signature is 86 characters; much longer is not one
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")

T = TypeVar("T")


class WireError(ValueError):
    """A message that is not the shape it should be; ``str()`` names the key,
    and ``key`` is it (None when the message as a whole is wrong)."""

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
    ):
        renames = _RENAMES.get(cls, {})
        overrides = {
            f.name: override(rename=renames.get(f.name, _camel(f.name)))
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


def _first_error(exc: BaseException, cls: type) -> WireError:
    """Our own words for why structuring ``cls`` failed: the wire key, and
    what it must be."""
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
            key = _wire_key(cls, field) if field else None
            shown = key or "params"
            if isinstance(sub, KeyError):
                return WireError(f"{shown} is missing", key)
            if isinstance(sub, WireError):
                return WireError(f"{shown} {sub}", key)
            return WireError(f"{shown} is not valid", key)
    if isinstance(exc, WireError):
        return WireError(f"params {exc}")
    return WireError("params are not valid")


def structure(value: object, cls: type[T]) -> T:
    """``value`` (parsed JSON) as ``cls``; raises :class:`WireError`."""
    if not isinstance(value, dict):
        raise WireError("params must be an object")
    try:
        return converter.structure(value, cls)
    except (cattrs.BaseValidationError, WireError) as exc:
        raise _first_error(exc, cls) from None


def address_of(info: ConnectionInfo) -> NodeAddress:
    """The dialable address of a connection entry; raises InvalidAddressError."""
    return NodeAddress(info.host, info.port)
