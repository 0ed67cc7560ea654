"""Anchors: the connections a node keeps (to its seeds), and where it is seen.

Theory of operation
-------------------
An anchored connection is never reaped (its TTL is None) and is re-dialled
when lost, trying each of its addresses in turn, with a backoff from 1 s
doubling to 60 s. While it is up it is pinged every
:data:`ANCHOR_PING_INTERVAL`: that renews the peer's TTL of it, and the
answer says at which address the peer sees us, our reflexive address. The last :data:`_MAX_REFLEXIVE` of them, most recent first, tell
whether we are behind a NAT (:meth:`Anchors.behind_nat`: one is not an
address of this machine). Behind a NAT, a reservation is held on each
anchor that relays, renewed at half its lifetime, so that nodes a punch
cannot serve reach us through it.

A Polykey seed has no ``nodesPing``: its anchor is kept all the same, but
tells us nothing of where we are seen. :class:`Anchors` reaches the pool
and relaying only through the manager's methods.
"""

from __future__ import annotations

import functools
import logging
import math
import socket as stdlib_socket
from typing import TYPE_CHECKING, Final

import trio

from ..keys import NodeId
from ..quic import Address
from ._connection import NodeConnection, NodeConnectionError
from ._failures import PEER_FAILURES
from ._handlers import PING
from ._wire import PingAnswer, WireError, structure

if TYPE_CHECKING:
    from ._connections import NodeConnectionManager

__all__ = ["ANCHOR_PING_INTERVAL", "Anchors"]

#: Anchored connections (to seeds) are pinged this often: it renews the
#: peer's TTL of the connection, and tells us our reflexive address.
ANCHOR_PING_INTERVAL: Final = 25.0
#: Reflexive addresses remembered.
_MAX_REFLEXIVE: Final = 8

log = logging.getLogger("polykey.nodes.anchors")


@functools.cache
def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine (binding to it works)."""
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    probe = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
    try:
        probe.bind((host, 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Anchors:
    """The anchored connections of ``manager``'s node."""

    def __init__(self, manager: NodeConnectionManager) -> None:
        self._manager = manager
        # Connections we keep (to seeds): never reaped, re-dialled when lost.
        self._anchored: set[NodeId] = set()
        # Where peers see us, most recent first.
        self.reflexive: list[Address] = []

    def holds(self, node_id: NodeId) -> bool:
        """Whether the connection to ``node_id`` is anchored (kept)."""
        return node_id in self._anchored

    def behind_nat(self) -> bool:
        """:meth:`NodeConnectionManager.behind_nat`."""
        return any(not _is_local(host) for host, _ in self.reflexive)

    def anchor(self, node_id: NodeId, addresses: list[Address]) -> None:
        """:meth:`NodeConnectionManager.anchor`."""
        if node_id in self._anchored or not self._manager.running:
            return
        self._anchored.add(node_id)
        self._manager.spawn(self._anchor, node_id, addresses)

    async def _anchor(self, node_id: NodeId, addresses: list[Address]) -> None:
        manager = self._manager
        backoff = 1.0
        while True:
            conn = manager.get(node_id)
            if conn is None:
                for address in addresses:
                    with trio.move_on_after(manager.attempt_timeout()):
                        try:
                            conn = await manager.connect(node_id, address)
                            break
                        except (NodeConnectionError, OSError):
                            pass
            if conn is None:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            await self._ping_anchor(conn)
            # Behind a NAT, hold a reservation on the seed (if it relays) so
            # that nodes a punch cannot serve reach us through it.
            renew_at = math.inf
            if self.behind_nat():
                lasts = await manager.reserve(conn)
                if lasts is not None:
                    renew_at = trio.current_time() + lasts / 2
            while not conn.connection.closed and trio.current_time() < renew_at:
                with trio.move_on_after(ANCHOR_PING_INTERVAL):
                    await conn.connection.wait_closed()
                if not conn.connection.closed:
                    await self._ping_anchor(conn)

    async def _ping_anchor(self, conn: NodeConnection) -> None:
        manager = self._manager
        with trio.move_on_after(manager.attempt_timeout(manager.rpc_timeout)):
            try:
                result = await conn.rpc.unary(PING, {})
            except PEER_FAILURES as exc:
                # Not ours (a Polykey seed has no nodesPing), or gone: the
                # connection's own liveness tells which.
                log.debug("anchor ping to %s failed: %r", conn.node_id, exc)
                return
            try:
                seen = structure(result, PingAnswer, at="answer").address
            except WireError as exc:
                log.debug("anchor %s: its ping's %s", conn.node_id, exc)
                return
            if seen is not None:
                self._note_reflexive(seen.as_tuple())

    def _note_reflexive(self, address: Address) -> None:
        if address in self.reflexive:
            self.reflexive.remove(address)
        self.reflexive.insert(0, address)
        del self.reflexive[_MAX_REFLEXIVE:]
