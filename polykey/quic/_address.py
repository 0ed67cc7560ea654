"""Addresses: the project's one host/port type, and peers' addresses as a
dual-stack socket reports them."""

from __future__ import annotations

import errno
from typing import Any, TypeAlias

__all__ = ["Address", "SockAddr", "for_family", "unmap_ipv4"]

#: A host and a port, ``(host, port)``: what a caller dials, sends to and
#: listens on, in polykey.quic and the layers above it (polykey.nodes keeps
#: its validated form, :class:`~polykey.nodes.NodeAddress`, whose
#: ``as_tuple()`` is one of these).
Address: TypeAlias = tuple[str, int]

#: An :data:`Address` as a socket of one family reports a peer: on an IPv4
#: socket ``(host, port)``, on an IPv6 (dual-stack) one ``(host, port,
#: flowinfo, scope_id)`` with IPv4 written IPv4-mapped. Routes are keyed by
#: it; :meth:`QUICSocket.normalize_address` turns an Address into one. Only
#: the driver's internals and the addresses the kernel reports
#: (``local_address``, ``remote_address``) have this shape.
SockAddr: TypeAlias = tuple[Any, ...]


def unmap_ipv4(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, how a
    dual-stack socket reports IPv4 peers) written as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def for_family(address: SockAddr, *, ipv6: bool) -> SockAddr:
    """``address`` as a socket of that family reports peers: on an IPv6
    (dual-stack) socket, IPv4 becomes IPv4-mapped IPv6 with flow info and
    scope id; on an IPv4 socket, IPv4-mapped IPv6 becomes plain IPv4 and
    any other IPv6 address is refused (``EAFNOSUPPORT``)."""
    host = address[0]
    if ipv6:
        if ":" not in host:
            return (f"::ffff:{host}", address[1], 0, 0)
        if len(address) == 2:
            return (host, address[1], 0, 0)
        return address
    if ":" in host:
        plain = unmap_ipv4(host)
        if plain == host:
            raise OSError(errno.EAFNOSUPPORT, f"IPv6 address {host} on an IPv4 socket")
        return (plain, address[1])
    return (host, address[1])
