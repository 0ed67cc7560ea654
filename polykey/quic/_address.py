"""Peer addresses as a dual-stack socket reports them."""

from __future__ import annotations

import errno

from ._binding import Address

__all__ = ["for_family", "unmap_ipv4"]


def unmap_ipv4(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, how a
    dual-stack socket reports IPv4 peers) written as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def for_family(address: Address, *, ipv6: bool) -> Address:
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
