"""Hole punching, both halves, on the node's one QUIC socket.

Theory of operation
-------------------
The protocol is :mod:`polykey.nodes._signalling`'s. Both halves live here,
since both use the one socket the connection manager dials and accepts on
(the only way a punch can work):

- **The initiator.** :meth:`Puncher.connect` asks a signaller to signal the
  target (steps 1 and 4 of the protocol) and dials the address it answers
  with, re-sending the first Initial at short intervals, and dialling too
  wherever the target's punch packets come from (its peer-reflexive
  address: a symmetric NAT maps it anew toward us); the first verified
  connection wins. While it runs, it counts as the manager's dial in
  flight to the target, so a plain dial waits for it instead of racing it
  through the hole it opens; and from the moment its request leaves, any
  connection with the target is ``punched`` (:meth:`Puncher.arrived`), as
  the target marks it on its side.
- **The target.** :meth:`Puncher.punch` sprays noise toward a node that
  asked us through a signaller, until that node's connection arrives, for
  at most :data:`PUNCH_DURATION`; a connection from it that arrives
  meanwhile is ``punched`` (:meth:`Puncher.arrived`). Punches are bounded
  in all and per host, and one toward an address already being punched is
  not doubled.
- **The signaller.** :meth:`Puncher.forward_signal` forwards a signal to
  its target, fire and forget, at most :data:`MAX_FORWARDS` at once.
- **Upgrades.** A node reached through a relay is punched again and again
  through that relay (which is connected to both, so it signals), with a
  doubling pause (:meth:`Puncher.upgrade`); a punched connection then
  takes the relayed one's place in the pool.

The manager is the signalling handlers'
:class:`~polykey.nodes._signalling.SignalHost` and hands their calls here; a
:class:`Puncher` reaches the pool only through the manager's methods.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final

import trio

from ..keys import NodeId
from ..quic import (
    Address,
    CloseKind,
    CloseReason,
    QUICClient,
    QUICConnection,
    QUICConnectionError,
    node_verifier,
    spray_delays,
)
from ..rpc import JSONObject, RPCRemoteError
from ._address import NodeAddress, format_host_port
from ._connection import (
    CLOSE_DUPLICATE,
    ConnectionPath,
    NodeConnection,
    NodeConnectionError,
)
from ._failures import note_failure
from ._signalling import SIGNAL_FINAL, SignalRequest, request_signal

if TYPE_CHECKING:
    from ._connections import NodeConnectionManager

__all__ = [
    "MAX_FORWARDS",
    "MAX_PUNCHES",
    "MAX_PUNCHES_PER_HOST",
    "PUNCH_DURATION",
    "Puncher",
]

# The manager's logger: what the parts log reads as the manager's.
log = logging.getLogger("polykey.nodes.connections")

#: How long a punch toward one address goes on (Polykey's target: 15 s).
PUNCH_DURATION: Final = 15.0
#: Punches running at once, in all and toward one host (Polykey: 3 per host).
MAX_PUNCHES: Final = 64
MAX_PUNCHES_PER_HOST: Final = 3
#: Signals forwarded at once (fire and forget); past it they are dropped.
MAX_FORWARDS: Final = 64
#: Punches under way that are remembered (their marks, :meth:`Puncher.arrived`).
_MAX_AWAITED: Final = 4 * MAX_PUNCHES
#: Bytes of noise per punch packet (Polykey sends 32 random bytes).
_PUNCH_BYTES: Final = 32
#: The first retry of a punch over a relayed connection, then doubling.
_UPGRADE_FIRST: Final = 5.0
_UPGRADE_MAX: Final = 300.0


class Puncher:
    """The hole punching of ``manager``'s node; ``client`` is the manager's
    client on the shared socket."""

    def __init__(self, manager: NodeConnectionManager, client: QUICClient) -> None:
        self._manager = manager
        self._client = client
        # Punches we are sending, by (host, port); and the nodes they are
        # for, until their connection arrives (it is then "punched").
        self._punching: set[Address] = set()
        self._punch_hosts: dict[str, int] = {}
        # The nodes we punch with, until when: one that asked us (we punch
        # toward it) and one we asked (it punches toward us, from the moment
        # our request left). A connection with one before then came through
        # that punch, whichever side dialled and whichever dial it was; both
        # sides mark it so, and so agree on its path.
        self._awaiting_punch: dict[NodeId, float] = {}
        self._forwards = 0
        self.punches = 0
        self.punches_refused = 0
        self.punched_dials = 0
        self.punched_dial_failures = 0
        self.signals_forwarded = 0
        self.signals_dropped = 0
        self.signal_failures = 0

    # -- the initiator ------------------------------------------------------------

    async def connect(
        self, node_id: NodeId, signaller: NodeConnection
    ) -> NodeConnection:
        """:meth:`NodeConnectionManager.connect_punched`."""
        manager = self._manager
        existing = manager.get(node_id)
        if existing is not None:
            await trio.lowlevel.checkpoint()
            return existing
        if node_id == manager.node_id:
            raise ValueError("a node does not connect to itself")
        # Once the signaller relays, the target opens its NAT to us, which
        # may be before its answer reaches us: a plain dial to it started
        # after we asked would slip through the same hole and race this one
        # (a second connection, and the wrong path on whichever wins). So
        # connect() waits for this attempt, as for any dial in flight, and
        # dials itself only if it fails.
        # A dial already in flight is left to run: its Initial went out
        # before any hole could open, though a copy it re-sends may get in.
        started = trio.current_time()
        with manager.dialling(node_id):
            address = await self._request(signaller, node_id)
            log.debug(
                "%s signalled %s: dialling it at %s",
                signaller.node_id,
                node_id,
                format_host_port(address.host, address.port),
            )
            self.punched_dials += 1
            async with manager.dial_limit:
                try:
                    conn = await self._dial(node_id, address)
                except NodeConnectionError:
                    self.punched_dial_failures += 1
                    raise
            existing = manager.get(node_id)
            if existing is not None:
                # Its own connection arrived meanwhile (it dialled us, or
                # another race won): keep one.
                await conn.aclose(CLOSE_DUPLICATE, b"duplicate")
                return existing
            return await manager.adopt_dialled(
                conn, path=ConnectionPath.PUNCHED, started=started
            )

    async def _request(self, signaller: NodeConnection, node_id: NodeId) -> NodeAddress:
        """Ask ``signaller`` to have ``node_id`` punch toward us; its answer,
        ``node_id``'s address as the signaller sees it.

        The signaller forwards before it answers, so the target's NAT may
        open to us before the answer is back: from the moment the request
        leaves, a connection with the target is punched (:meth:`arrived`).
        A dial of ours in flight from before re-sends its Initial into the
        hole, and under load its handshake can finish before the task that
        awaits the answer runs (the NAT lab saw it labelled direct)."""
        previous = self._awaiting_punch.get(node_id)
        ours = self._await_punch(node_id)
        try:
            return await request_signal(signaller.rpc, self._manager.identity, node_id)
        except RPCRemoteError:
            # Refused: nothing was forwarded, so nothing opens. Unless the
            # mark moved meanwhile: another request to the same node (the
            # finder asks several signallers at once), or its own signal.
            if self._awaiting_punch.get(node_id) == ours:
                if previous is None:
                    del self._awaiting_punch[node_id]
                else:
                    self._awaiting_punch[node_id] = previous
            raise

    def _await_punch(self, node_id: NodeId) -> float:
        """Mark a punch with ``node_id`` under way for PUNCH_DURATION; the
        mark's end."""
        now = trio.current_time()
        awaiting = self._awaiting_punch
        if node_id not in awaiting and len(awaiting) >= MAX_PUNCHES:
            for stale in [n for n, until in awaiting.items() if until <= now]:
                del awaiting[stale]
            if len(awaiting) >= _MAX_AWAITED:
                del awaiting[next(iter(awaiting))]  # the oldest mark
        until = awaiting[node_id] = max(
            now + PUNCH_DURATION, awaiting.get(node_id, 0.0)
        )
        return until

    async def _dial(self, node_id: NodeId, address: NodeAddress) -> QUICConnection:
        """Dial ``address`` with spraying, and every source the target's
        punch packets arrive from (its peer-reflexive addresses); the first
        verified connection wins and cancels the rest."""
        winner: QUICConnection | None = None
        errors: list[BaseException] = []
        with self._manager.socket.watch_strays(address.host) as strays:
            async with trio.open_nursery() as nursery:

                async def attempt(target: Address) -> None:
                    nonlocal winner
                    try:
                        conn = await self._client.connect(
                            target, verifier=node_verifier(node_id), spray=True
                        )
                    except (QUICConnectionError, OSError) as exc:
                        errors.append(exc)
                        return
                    if winner is None:
                        winner = conn
                        nursery.cancel_scope.cancel()
                    else:
                        await conn.aclose(CLOSE_DUPLICATE, b"duplicate")

                async def reflexive() -> None:
                    n = 0
                    while True:
                        source = await strays.wait_source(n)
                        n += 1
                        if source != address.as_tuple():
                            log.debug("punch from %s: dialling it too", source)
                            nursery.start_soon(attempt, source)

                nursery.start_soon(attempt, address.as_tuple())
                nursery.start_soon(reflexive)
        if winner is None:
            reason = errors[-1] if errors else "no answer"
            raise NodeConnectionError(
                CloseReason(CloseKind.LOCAL, reason=b"punch failed"),
                f"{node_id} at {address.host}:{address.port}: punch failed: {reason}",
            )
        return winner

    async def upgrade(self, relayed: NodeConnection, relay_id: NodeId) -> None:
        """Keep trying to punch through to a node we reach by relay; a
        punched connection then takes the relayed one's place."""
        manager = self._manager
        delay = _UPGRADE_FIRST
        node_id = relayed.node_id
        while not relayed.connection.closed and manager.pooled(node_id) is relayed:
            await trio.sleep(delay)
            delay = min(delay * 2, _UPGRADE_MAX)
            relay = manager.get(relay_id)
            if relay is None or relayed.connection.closed:
                return
            with trio.move_on_after(max(3.0, 4 * manager.attempt_timeout())):
                started = trio.current_time()
                try:
                    address = await self._request(relay, node_id)
                    conn = await self._dial(node_id, address)
                except Exception as exc:
                    if not note_failure(log, "upgrade of", node_id, exc):
                        manager.task_errors += 1
                    continue
                manager.adopt(
                    conn, outgoing=True, path=ConnectionPath.PUNCHED, started=started
                )
                return

    # -- the target and the signaller -----------------------------------------------

    def arrived(self, node_id: NodeId, now: float) -> bool:
        """A connection with ``node_id`` arrived at ``now``, dialled by
        either side: whether a punch with it was under way (it is then
        "punched"), toward it or (since our request left) from it. That
        punch is then over."""
        return self._awaiting_punch.pop(node_id, 0.0) > now

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        """:meth:`NodeConnectionManager.forward_signal`."""
        if not self._manager.running or self._forwards >= MAX_FORWARDS:
            self.signals_dropped += 1
            return
        self._forwards += 1
        self._manager.spawn(self._forward, target, params)

    async def _forward(self, target: NodeId, params: JSONObject) -> None:
        try:
            with trio.move_on_after(self._manager.rpc_timeout):
                node = self._manager.get(target)
                if node is None:
                    self.signal_failures += 1
                    return
                try:
                    await node.rpc.unary(SIGNAL_FINAL, params)
                except Exception as exc:
                    # Fire and forget: the requester learns nothing of it.
                    self.signal_failures += 1
                    if not note_failure(log, "signal to", target, exc):
                        self._manager.task_errors += 1
                    return
                self.signals_forwarded += 1
        finally:
            self._forwards -= 1

    def punch(self, request: SignalRequest) -> None:
        """:meth:`NodeConnectionManager.punch`."""
        key = request.address.as_tuple()
        host = key[0]
        if (
            not self._manager.running
            or key in self._punching
            or len(self._punching) >= MAX_PUNCHES
            or self._punch_hosts.get(host, 0) >= MAX_PUNCHES_PER_HOST
        ):
            self.punches_refused += 1
            return
        log.debug(
            "signal from %s: punching toward %s",
            request.source,
            format_host_port(*key),
        )
        self._punching.add(key)
        self._punch_hosts[host] = self._punch_hosts.get(host, 0) + 1
        self._await_punch(request.source)
        self.punches += 1
        self._manager.spawn(self._punch, request, key)

    async def _punch(self, request: SignalRequest, key: Address) -> None:
        try:
            with trio.move_on_after(PUNCH_DURATION):
                for delay in spray_delays():
                    if self._manager.get(request.source) is not None:
                        return  # its connection is here
                    try:
                        await self._manager.socket.send(os.urandom(_PUNCH_BYTES), key)
                    except OSError as exc:
                        log.debug("punch to %s: %s", format_host_port(*key), exc)
                    await trio.sleep(delay)
        finally:
            if self._awaiting_punch.get(request.source, 0.0) <= trio.current_time():
                self._awaiting_punch.pop(request.source, None)
            self._punching.discard(key)
            left = self._punch_hosts.get(key[0], 1) - 1
            if left:
                self._punch_hosts[key[0]] = left
            else:
                self._punch_hosts.pop(key[0], None)
