"""The root of polykey's exceptions.

Each layer (keys, quic, rpc, nodes) defines its own hierarchy under
:class:`PolykeyError`, and reuses trio's meanings where they fit: a resource
closed by its own side raises :class:`trio.ClosedResourceError`, one broken
by the peer or the network raises :class:`trio.BrokenResourceError`, and a
second task using a one-task resource raises :class:`trio.BusyResourceError`.
"""

from __future__ import annotations

__all__ = ["PolykeyError"]


class PolykeyError(Exception):
    """Base class of every exception polykey defines."""
