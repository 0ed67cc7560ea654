"""Node addresses and contacts, validated at the edge.

A :class:`NodeAddress` is ``(host, port)`` where host is an IP literal in
canonical form (IPv4-mapped IPv6 written as IPv4) or a lower-case DNS
hostname. What cannot be dialled is refused here, once, so nothing behind
this module ever sees it: port 0 or out of range, scoped IPv6 (``fe80::1%eth0``
hung Polykey's event loop, a reported bug), unspecified and multicast
addresses, and hostnames that are not RFC 1123 names.

On the wire (Polykey's ``NodeContact``) an address is the key
``"host-port"``, IPv6 included (``"::1-1314"``); :func:`format_contact_address`
/ :func:`parse_contact_address` convert.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

import attrs

from ..keys import NodeId
from ..quic import Address
from ._errors import InvalidAddressError

__all__ = [
    "MAX_ADDRESSES",
    "NodeAddress",
    "NodeContact",
    "format_contact_address",
    "format_host_port",
    "parse_address",
    "parse_contact_address",
    "parse_host_port",
]

#: Addresses kept per node (Polykey keeps a few; a peer cannot make it more).
MAX_ADDRESSES: Final = 5

_MAX_HOSTNAME: Final = 253
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _canonical_host(host: object) -> str:
    if not isinstance(host, str):
        raise InvalidAddressError(f"host must be a string, not {type(host).__name__}")
    if not host:
        raise InvalidAddressError("empty host")
    if len(host) > _MAX_HOSTNAME:
        raise InvalidAddressError(f"host is longer than {_MAX_HOSTNAME} characters")
    if "%" in host:
        raise InvalidAddressError(f"scoped IPv6 address {host!r} is not usable")
    return _canonical_text(host)


# Every lookup answer names 20 addresses, mostly ones seen before, and
# parsing an IP address costs some 5 us; bounded, so a peer naming new
# hosts only evicts entries. (A refused host raises, and is not kept.)
@functools.lru_cache(maxsize=4096)
def _canonical_text(host: str) -> str:
    quad = _plain_ipv4(host)
    return quad if quad is not None else _canonical_slow(host)


def _plain_ipv4(host: str) -> str | None:
    """``host`` itself when it is an IPv4 address in canonical form with a
    first octet of 1-223 (unicast, so nothing to refuse): what
    :func:`_canonical_slow` returns for it. None for anything else, which
    the slow path decides. A third of a lookup answer's parsing went into
    ipaddress (bench/node_messages.py: 423 us an answer); a hypothesis test
    (tests/nodes/test_address.py) holds the two to the same answers."""
    parts = host.split(".")
    if len(parts) != 4:
        return None
    for part in parts:
        if not (0 < len(part) <= 3 and part.isascii() and part.isdigit()):
            return None
        if part[0] == "0" and len(part) > 1:
            return None  # leading zeros: ipaddress refuses them
        if int(part) > 255:
            return None
    return host if 1 <= int(parts[0]) <= 223 else None


def _canonical_slow(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _check_hostname(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidAddressError(f"{host!r} is not a unicast address")
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        raise InvalidAddressError("the broadcast address is not a node address")
    return str(ip)


def _check_hostname(host: str) -> str:
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if not name or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidAddressError(
            f"{_short(host)} is neither an IP address nor a hostname"
        )
    # "1.2.3" and friends are IPv4 to some resolvers: refuse the ambiguity.
    if labels[-1].isdigit():
        raise InvalidAddressError(f"{_short(host)} looks like a malformed IP address")
    return name


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidAddressError(f"port must be an integer, not {type(port).__name__}")
    if not 0 < port < 65536:
        raise InvalidAddressError(f"port {port} is out of range 1..65535")
    return port


@attrs.frozen(order=True)
class NodeAddress:
    """A contact's address as the graph stores it and the wire carries it:
    a dialable host and port, validated and canonical; construct with
    :func:`parse_address` (or directly, which validates and canonicalises
    the same way).

    Not a second address type: :data:`polykey.quic.Address` is any
    ``(host, port)`` a socket can be given; a NodeAddress is one that passed
    this module's checks, so what holds one never re-checks it.
    :meth:`as_tuple` gives the Address to dial."""

    host: str = attrs.field(converter=_canonical_host)
    port: int = attrs.field(converter=_check_port)

    def __str__(self) -> str:
        return format_contact_address(self)

    def as_tuple(self) -> Address:
        return (self.host, self.port)


def parse_address(host: object, port: object) -> NodeAddress:
    """A validated :class:`NodeAddress`; raises :class:`InvalidAddressError`."""
    return NodeAddress(host, port)


def parse_host_port(text: str) -> NodeAddress:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6), as :func:`format_host_port`
    writes it, validated as a :class:`NodeAddress` (so ``::``, multicast,
    scoped IPv6 and port 0 are refused); raises InvalidAddressError."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise InvalidAddressError(f"{_short(text)}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise InvalidAddressError(
                f"{_short(text)}: expected HOST:PORT ([IPV6]:PORT for IPv6)"
            )
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise InvalidAddressError(f"port {port_text!r} is not a number")
    return NodeAddress(host, int(port_text))


def format_host_port(host: str, port: int) -> str:
    """``host:port`` as people type it: ``[v6]:port`` for IPv6 (brackets,
    so the port is unambiguous), ``host:port`` otherwise."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_contact_address(address: NodeAddress) -> str:
    """Polykey's ``NodeContactAddress`` key: ``host-port`` for IPv4, IPv6
    (no brackets) and hostnames alike (Polykey's nodes/utils
    ``nodeContactAddress``; a Polykey 1.15 agent sends ``127.0.0.1-47254``)."""
    return f"{address.host}-{address.port}"


def parse_contact_address(text: object) -> NodeAddress:
    """Inverse of :func:`format_contact_address` (split at the last ``-``, as
    hostnames may contain dashes); raises InvalidAddressError."""
    if not isinstance(text, str):
        raise InvalidAddressError("a contact address must be a string")
    if len(text) > _MAX_HOSTNAME + 10:
        raise InvalidAddressError("contact address is too long")
    host, dash, port_text = text.rpartition("-")
    if not dash or not host:
        raise InvalidAddressError(f"malformed contact address {_short(text)}")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise InvalidAddressError(f"malformed port in {_short(text)}")
    return NodeAddress(host, int(port_text))


def _dedupe_addresses(addresses: Iterable[NodeAddress]) -> tuple[NodeAddress, ...]:
    out: list[NodeAddress] = []
    for address in addresses:
        if not isinstance(address, NodeAddress):
            raise TypeError(f"expected NodeAddress, got {type(address).__name__}")
        if address not in out:
            out.append(address)
            if len(out) == MAX_ADDRESSES:
                break
    return tuple(out)


@attrs.frozen
class NodeContact:
    """A NodeId and where it may be reached (most recently seen first, at
    most :data:`MAX_ADDRESSES`, no duplicates)."""

    node_id: NodeId = attrs.field(validator=attrs.validators.instance_of(NodeId))
    addresses: tuple[NodeAddress, ...] = attrs.field(
        default=(), converter=_dedupe_addresses
    )
