"""Peer addresses as a dual-stack socket reports them."""

from __future__ import annotations

__all__ = ["unmap_ipv4"]


def unmap_ipv4(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, how a
    dual-stack socket reports IPv4 peers) written as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host
