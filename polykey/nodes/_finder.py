"""Connecting to a NodeId: direct dialling and signalled punching, raced.

Theory of operation
-------------------
:meth:`NodeFinder.connect` runs two searches in one nursery; the first
verified connection to the target cancels the other (and everything either
had in flight):

* **direct**: dial the addresses the graph holds for the target, then run a
  Kademlia find (:meth:`NodeManager.find_node`); a find that reaches the
  target leaves a pooled connection to it, otherwise its addresses are
  dialled. This is all a public node, or one behind a full-cone NAT, needs.
* **signalled** (Polykey's ``findNodeBySignal``): starting from the nodes we
  hold connections to, closest to the target first, ask each
  ``nodesClosestActiveConnectionsGet(target)``. A node that lists the
  target holds a connection to it: it is a signaller, and we punch through
  it (:meth:`NodeConnectionManager.connect_punched`); if no punch has
  worked a little later (a symmetric NAT facing a filtering one never
  will), we also connect through it as a relay
  (:meth:`NodeConnectionManager.connect_relayed`, see polykey.nodes._relay).
  The nodes it lists (the ``alpha`` closest to the target not yet asked)
  are reached at once (pooled, dialled at the address it reports, or
  punched through it) and asked in turn, so the search walks a chain of
  signallers toward the target. At most ``alpha`` are asked at once and
  ``max_contacted`` in all.

Every attempt has its own deadline, from the connection manager's
:meth:`~NodeConnectionManager.attempt_timeout` (what dials and queries
have taken lately), so a dead node costs a fraction of a second on a fast network;
punches get a few times that (a signal, then the punch itself). The whole
operation is bounded by the caller's cancel scope, as trio would have it:
there is no ``timeout=`` argument. Failures inside a search are routine and
swallowed (counted); when both searches are exhausted the target is not
found (:class:`NodeNotFoundError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from ..keys import NodeId
from ..quic import Address
from ..rpc import RPCClient
from ._address import NodeContact
from ._connections import ConnectionPath
from ._errors import NodeNotFoundError, OwnNodeIdError
from ._failures import note_failure
from ._handlers import request_closest_active_connections
from ._lookup import DEFAULT_ALPHA, DEFAULT_MAX_CONTACTED
from ._manager import NodeManager

__all__ = ["Connector", "FinderStatistics", "Link", "NodeFinder"]

log = logging.getLogger("polykey.nodes.finder")

#: A punch gets this many attempt timeouts, and at least PUNCH_MIN seconds:
#: it is a signal round trip, then a dial through a NAT that opens late.
_PUNCH_ATTEMPTS = 4
_PUNCH_MIN = 3.0
#: The relay is tried this many attempt timeouts (at least this many
#: seconds) after the punch began.
_RELAY_DELAY_ATTEMPTS = 2
_RELAY_DELAY_MIN = 1.0


class Link(Protocol):
    """A verified connection, as the finder sees it."""

    @property
    def node_id(self) -> NodeId: ...

    @property
    def rpc(self) -> RPCClient[Any]: ...

    @property
    def path(self) -> ConnectionPath: ...


class Connector(Protocol):
    """What the finder needs of the node's connections:
    :class:`~polykey.nodes.NodeConnectionManager` over QUIC, or a simulated
    network with NAT models (``polykey.testing``) under MockClock."""

    @property
    def node_id(self) -> NodeId: ...

    def get(self, node_id: NodeId) -> Link | None:
        """The pooled live connection to ``node_id``."""

    def active(self) -> Sequence[Link]:
        """Every live connection."""

    async def connect(self, node_id: NodeId, address: Address) -> Link:
        """Dial ``node_id`` at ``address``."""

    async def connect_punched(self, node_id: NodeId, signaller: Any) -> Link:
        """Punch through to ``node_id``, signalled by ``signaller``."""

    async def connect_relayed(self, node_id: NodeId, relay: Any) -> Link:
        """Connect to ``node_id`` through ``relay``."""


@attrs.define
class FinderStatistics:
    connects: int = 0
    found_direct: int = 0
    found_punched: int = 0
    found_relayed: int = 0
    not_found: int = 0
    signallers_asked: int = 0
    search_errors: int = 0
    #: Of those, failures that were bugs of ours, not a peer's (logged at
    #: WARNING with the traceback).
    unexpected_errors: int = 0


class NodeFinder:
    """``await finder.connect(node_id)``: a verified connection by NodeId."""

    def __init__(
        self,
        manager: NodeManager,
        connections: Connector,
        *,
        alpha: int = DEFAULT_ALPHA,
        max_contacted: int = DEFAULT_MAX_CONTACTED,
    ) -> None:
        self.manager = manager
        self.connections = connections
        self.alpha = alpha
        self.max_contacted = max_contacted
        self.statistics = FinderStatistics()

    def _attempt(self) -> float:
        return self.manager.attempt_deadline()

    def _punch_attempt(self) -> float:
        return max(_PUNCH_MIN, _PUNCH_ATTEMPTS * self._attempt())

    async def connect(self, node_id: NodeId) -> Link:
        """A verified connection to ``node_id``: pooled, dialled, or punched.

        Bounded by the caller's cancel scope; raises NodeNotFoundError when
        every way was tried and none worked, OwnNodeIdError for our own.
        """
        if node_id == self.connections.node_id:
            # Else the lookup raises it inside the race, as an ExceptionGroup.
            raise OwnNodeIdError("a node does not connect to itself")
        self.statistics.connects += 1
        pooled = self.connections.get(node_id)
        if pooled is not None:
            await trio.lowlevel.checkpoint()
            return pooled
        winner: Link | None = None
        async with trio.open_nursery() as nursery:

            def won(conn: Link) -> None:
                nonlocal winner
                if winner is None:
                    winner = conn
                    nursery.cancel_scope.cancel()

            nursery.start_soon(self._direct, node_id, won)
            nursery.start_soon(self._signalled, node_id, won)
        if winner is None:
            self.statistics.not_found += 1
            raise NodeNotFoundError(node_id, "not reached directly or by a punch")
        if winner.path.value == "punched":
            self.statistics.found_punched += 1
        elif winner.path.value == "direct":
            self.statistics.found_direct += 1
        return winner

    # -- direct ------------------------------------------------------------------

    async def _dial_known(self, contact: NodeContact) -> Link | None:
        # The peer's own deadline (longer after failures), and a failure
        # that counts as the manager's do: the lookup that may follow then
        # backs off instead of spending a second short deadline on it.
        node_id = contact.node_id
        began = trio.current_time()
        for address in contact.addresses:
            with trio.move_on_after(self.manager.attempt_deadline(node_id)):
                try:
                    return await self.connections.connect(node_id, address.as_tuple())
                except Exception as exc:
                    self._failed("dial", node_id, exc)
        self.manager.note_unreachable(node_id, began)
        return None

    async def _direct(self, node_id: NodeId, won: Callable[[Link], None]) -> None:
        known = self.manager.graph.get(node_id)
        if known is not None:
            conn = await self._dial_known(known)
            if conn is not None:
                won(conn)
                return
        try:
            contact = await self.manager.find_node(node_id)
        except NodeNotFoundError:
            return
        conn = self.connections.get(node_id) or await self._dial_known(contact)
        if conn is not None:
            won(conn)

    # -- signalled -----------------------------------------------------------------

    async def _signalled(self, node_id: NodeId, won: Callable[[Link], None]) -> None:
        target = node_id.to_int()
        # Every node asked or queued to be: _ask reaches only nodes not in
        # it, and claims them before it returns them in ``found``.
        asked: set[NodeId] = {self.connections.node_id, node_id}
        frontier = [c for c in self.connections.active() if c.node_id not in asked]
        asked.update(c.node_id for c in frontier)
        contacted = 0
        while frontier and contacted < self.max_contacted:
            frontier.sort(key=lambda c: c.node_id.to_int() ^ target)
            batch = frontier[: self.alpha]
            del frontier[: self.alpha]
            contacted += len(batch)
            found: list[Link] = []
            async with trio.open_nursery() as nursery:
                for signaller in batch:
                    asked.add(signaller.node_id)
                    nursery.start_soon(self._ask, node_id, signaller, asked, found, won)
            frontier.extend(found)

    async def _ask(
        self,
        node_id: NodeId,
        signaller: Link,
        asked: set[NodeId],
        found: list[Link],
        won: Callable[[Link], None],
    ) -> None:
        self.statistics.signallers_asked += 1
        listing: list[NodeContact] = []
        with trio.move_on_after(self._attempt()):
            try:
                listing = await request_closest_active_connections(
                    signaller.rpc, node_id
                )
            except Exception as exc:
                self._failed("nodesClosestActiveConnectionsGet", signaller.node_id, exc)
        if any(c.node_id == node_id for c in listing):
            # The signaller holds a connection to the target: punch through
            # it, and should that not work soon, connect through it as a
            # relay (which fails at once if it offers none).
            async with trio.open_nursery() as race:
                race.start_soon(self._punch, node_id, signaller, won)
                race.start_soon(self._relay, node_id, signaller, won)
            if self.connections.get(node_id) is not None:
                return
        # Walk on through the nodes it is connected to, closest to the target
        # first (as Polykey's queue: no "closer than the signaller" rule,
        # which dead-ends when no path gets strictly closer), at most alpha
        # of them per signaller, reached at once.
        target = node_id.to_int()
        onward = sorted(
            (c for c in listing if c.node_id not in asked),
            key=lambda c: c.node_id.to_int() ^ target,
        )[: self.alpha]
        asked.update(c.node_id for c in onward)
        async with trio.open_nursery() as nursery:
            for contact in onward:
                nursery.start_soon(self._reach, contact, signaller, found)

    async def _reach(
        self, contact: NodeContact, signaller: Link, found: list[Link]
    ) -> None:
        """Reach a node a signaller listed: pooled, dialled, or punched
        through that signaller; add it to ``found``."""
        conn = self.connections.get(contact.node_id) or await self._dial_known(contact)
        if conn is None:
            with trio.move_on_after(self._punch_attempt()):
                try:
                    conn = await self.connections.connect_punched(
                        contact.node_id, signaller
                    )
                except Exception as exc:
                    self._failed("punch", contact.node_id, exc)
        if conn is not None:
            found.append(conn)

    async def _punch(
        self,
        node_id: NodeId,
        signaller: Link,
        won: Callable[[Link], None],
    ) -> None:
        with trio.move_on_after(self._punch_attempt()):
            try:
                won(await self.connections.connect_punched(node_id, signaller))
            except Exception as exc:
                self._failed("punch", node_id, exc)

    async def _relay(
        self,
        node_id: NodeId,
        relay: Link,
        won: Callable[[Link], None],
    ) -> None:
        # A punch between cone NATs takes about a round trip; give it a few
        # attempt timeouts before the relay, a slower path, is tried.
        await trio.sleep(max(_RELAY_DELAY_MIN, _RELAY_DELAY_ATTEMPTS * self._attempt()))
        if self.connections.get(node_id) is not None:
            return
        with trio.move_on_after(self._punch_attempt()):
            try:
                won(await self.connections.connect_relayed(node_id, relay))
                self.statistics.found_relayed += 1
            except Exception as exc:
                self._failed("relay", node_id, exc)

    def _failed(self, what: str, node_id: NodeId, exc: BaseException) -> None:
        # A peer's failure is routine in a search; it never ends the search.
        # Neither does a bug of ours in one attempt, but it is told.
        self.statistics.search_errors += 1
        if not note_failure(log, what, node_id, exc):
            self.statistics.unexpected_errors += 1
