"""How the nodes layer tells a peer's failure from a bug of ours.

A search, a ping or a keep-alive talks to peers that vanish, refuse, time
out or send nonsense: those are routine and cost the peer, never the node.
They surface as one of :data:`PEER_FAILURES` (every layer's errors derive
from :class:`~polykey.errors.PolykeyError`; sockets raise OSError; a broken
or closed stream raises trio's Broken/Closed). Anything else is a bug: it is
still contained (one attempt fails, not the node) but logged at WARNING
with the peer it came from and its traceback, so it gets fixed.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from ..errors import PolykeyError
from ..keys import NodeId

__all__ = ["PEER_FAILURES", "note_failure"]

#: What a peer (or the network) can make a call to it raise.
PEER_FAILURES: Final = (
    PolykeyError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def note_failure(
    log: logging.Logger, what: str, peer: NodeId | object, exc: BaseException
) -> bool:
    """Log ``what`` (toward ``peer``) failing with ``exc``: at DEBUG when it
    is a peer's failure, at WARNING with the traceback when it is not.
    Returns whether it was a peer's failure (callers count the others)."""
    if isinstance(exc, PEER_FAILURES):
        log.debug("%s %s failed: %r", what, peer, exc)
        return True
    log.warning(
        "%s %s failed unexpectedly (a bug)",
        what,
        peer,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"peer": str(peer)},
    )
    return False
