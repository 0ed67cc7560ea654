"""The control methods' params as attrs classes, structured by one cattrs
converter.

Each method of ``_control_methods`` reads its params through a class here
(Python field names, docs/cli.md's camelCase keys), as the nodes layer
reads a peer's (nodes/_wire.py) and the CLI reads the node's answers
(``_replies``). What fails is one :class:`~polykey.rpc.RPCInvalidParams`
(-32602, which the CLI exits 65 on) naming the key in our words; a NodeId
that does not decode keeps :class:`~polykey.keys.NodeIdError`'s own text,
which says what is wrong with it ("must be 53 characters"). Keys a class
does not know are ignored (the RPC's ``metadata``; a newer CLI's additions).
"""

from __future__ import annotations

from typing import Any, Final, NewType, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from .keys import NodeId, NodeIdError
from .nodes import InvalidAddressError, NodeAddress
from .rpc import JSONValue, RPCInvalidParams

__all__ = ["NoParams", "NodesAddParams", "TargetParams", "read_params"]

T = TypeVar("T")

#: A UDP port, 1..65535 (checked before anything prints a huge integer).
Port = NewType("Port", int)


class _Refused(ValueError):
    """A hook's reason (completed with the key by :func:`read_params`)."""


@attrs.frozen
class NoParams:
    """A method that takes none: no params, or an object (ignored)."""


@attrs.frozen
class TargetParams:
    """``nodesFind`` / ``nodesPingNode``: ``{nodeIdEncoded}``."""

    node_id_encoded: NodeId


@attrs.frozen
class NodesAddParams:
    """``nodesAdd``: ``{nodeIdEncoded, host, port, ping?, force?}``."""

    node_id_encoded: NodeId
    host: str
    port: Port
    ping: bool = True
    force: bool = False

    def address(self) -> NodeAddress:
        """Where to add the node; raises RPCInvalidParams naming the host
        (the port passed its hook)."""
        try:
            return NodeAddress(self.host, self.port)
        except InvalidAddressError as exc:
            raise RPCInvalidParams(f"host is not dialable: {exc}") from None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _node_id(value: object, _: object) -> NodeId:
    if not isinstance(value, str):
        raise _Refused("must be a string")
    try:
        return NodeId.from_string(value)
    except NodeIdError as exc:
        raise _Refused(f"is not a NodeId: {exc}") from None


def _exactly(kind: type, what: str) -> Any:
    # JSON has no coercions: true is not 1, "1" is not 1.
    def hook(value: object, _: object) -> object:
        if type(value) is not kind:
            raise _Refused(f"must be {what}")
        return value

    return hook


def _port(value: object, _: object) -> Port:
    if type(value) is not int or not 0 < value < 65536:
        raise _Refused("must be a port number (1-65535)")
    return Port(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True)
    conv.register_structure_hook(NodeId, _node_id)
    conv.register_structure_hook(Port, _port)
    conv.register_structure_hook(str, _exactly(str, "a string"))
    conv.register_structure_hook(bool, _exactly(bool, "true or false"))
    for cls in (NoParams, TargetParams, NodesAddParams):
        overrides = {f.name: override(rename=_camel(f.name)) for f in attrs.fields(cls)}
        conv.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, conv, **overrides),  # type: ignore[arg-type]
        )
    return conv


_converter: Final = _make_converter()


def _reason(exc: cattrs.BaseValidationError) -> str:
    """The first failure, as ``key reason``."""
    for sub in exc.exceptions:
        field = next(
            (
                n.name
                for n in getattr(sub, "__notes__", [])
                if isinstance(n, cattrs.AttributeValidationNote)
            ),
            None,
        )
        key = _camel(field) if field else "params"
        if isinstance(sub, KeyError):
            return f"{key} is missing"
        if isinstance(sub, _Refused):
            return f"{key} {sub}"
        return f"{key} is not valid"
    return "params are not valid"


def read_params(params: JSONValue, cls: type[T]) -> T:
    """A control call's ``params`` as ``cls`` (no params at all is ``{}``);
    raises RPCInvalidParams naming the key."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RPCInvalidParams("params must be an object")
    try:
        return _converter.structure(params, cls)
    except cattrs.BaseValidationError as exc:
        raise RPCInvalidParams(_reason(exc)) from None
