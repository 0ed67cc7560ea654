"""SimConnections: a simulated node's Connector and SignalHost (see _natnet)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import trio

from ..keys import NodeId, NodeIdentity
from ..nodes import (
    PUNCH_DURATION,
    SIGNAL_FINAL,
    ActiveConnection,
    AttemptTimer,
    ConnectionPath,
    DialGate,
    NodeAddress,
    SignalRequest,
    format_host_port,
    request_signal,
)
from ..quic import Address, spray_delays
from ..rpc import JSONObject
from ._network import Unreachable
from ._simlink import Answer, Attempt, Initial, Noise, Packet, Refused, SimLink

if TYPE_CHECKING:
    from ._natnet import NatNetwork, NatNode

__all__ = ["SimConnections"]


class SimConnections:
    """A simulated node's connections: the
    :class:`~polykey.nodes._finder.Connector` the finder drives, and the
    :class:`~polykey.nodes._signalling.SignalHost` its signalling handlers
    call. See the module doc for what each call models."""

    def __init__(self, network: NatNetwork, node: NatNode) -> None:
        self._network = network
        self._node = node
        self._pool: dict[NodeId, SimLink] = {}
        self._gate = DialGate()
        self._timer = AttemptTimer()
        self._punch_attempts: set[Attempt] = set()
        self._punching: set[Address] = set()
        self._rng = random.Random(network.rng.getrandbits(64))
        self.dials = 0
        self.dial_failures = 0
        self.punched_dials = 0
        self.punched_dial_failures = 0
        self.relayed_dials = 0
        self.relayed_dial_failures = 0
        self.punches = 0
        self.signals_forwarded = 0
        self.signal_failures = 0

    @property
    def node_id(self) -> NodeId:
        return self._node.node_id

    @property
    def identity(self) -> NodeIdentity:
        return self._node.identity

    # -- the pool ------------------------------------------------------------------

    def get(self, node_id: NodeId) -> SimLink | None:
        """The pooled live link to ``node_id``."""
        link = self._pool.get(node_id)
        if link is not None and link.closed:
            del self._pool[node_id]
            return None
        return link

    def active(self) -> list[SimLink]:
        return [link for link in self._pool.values() if not link.closed]

    def active_connections(self) -> list[ActiveConnection]:
        """For ``nodesClosestActiveConnectionsGet``: each link's peer where
        this node sees it."""
        return [
            ActiveConnection(node_id=link.node_id, address=NodeAddress(*link.address))
            for link in self.active()
        ]

    def close(self, node_id: NodeId) -> None:
        """Close the link to ``node_id`` (both ends), as an idle TTL would."""
        link = self._pool.get(node_id)
        if link is not None:
            self._network._close_wire(link.wire)

    @property
    def dials_in_flight(self) -> int:
        """Attempts to reach a node under way (one per node at most)."""
        return len(self._gate)

    @property
    def attempts(self) -> AttemptTimer:
        """As :attr:`NodeConnectionManager.attempts`."""
        return self._timer

    def attempt_timeout(self, ceiling: float = 15.0) -> float:
        """As :meth:`NodeConnectionManager.attempt_timeout`: from the times
        direct dials and the manager's attempts took."""
        return self._timer.timeout(ceiling)

    def _adopt(self, link: SimLink) -> bool:
        """Pool ``link`` unless a live one is pooled; a relayed one gives
        way to another path. Returns whether it was pooled."""
        pooled = self.get(link.node_id)
        if pooled is None:
            self._pool[link.node_id] = link
            return True
        if (
            pooled.path is ConnectionPath.RELAYED
            and link.path is not ConnectionPath.RELAYED
        ):
            self._pool[link.node_id] = link
            self._network._close_later(pooled.wire)
            return True
        return False

    # -- the Connector ----------------------------------------------------------------

    async def connect(self, node_id: NodeId, address: Address) -> SimLink:
        """Dial ``node_id`` at ``address`` (a pooled link if there is one;
        concurrent dials to one node share an attempt). Raises
        :class:`Unreachable`; the caller's scope bounds it."""
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        existing = await self._gate.turn(node_id, lambda: self.get(node_id))
        if existing is not None:
            return existing
        with self._gate.attempt(node_id):
            self.dials += 1
            started = trio.current_time()
            try:
                link = await self._network._handshake(
                    self._node, node_id, (address,), ConnectionPath.DIRECT
                )
            except Unreachable:
                self.dial_failures += 1
                raise
            self._timer.note(trio.current_time() - started)
            return link

    async def dial_back(self, node_id: NodeId, address: Address) -> bool:
        """As :meth:`NodeConnectionManager.dial_back`: a direct handshake
        to ``address`` whatever is pooled (through the NATs as any; the
        link it makes is kept only where none is pooled)."""
        if node_id in self._gate:
            return False
        with self._gate.attempt(node_id):
            await self._network._handshake(
                self._node, node_id, (address,), ConnectionPath.DIRECT
            )
        return True

    async def connect_punched(self, node_id: NodeId, signaller: SimLink) -> SimLink:
        """Punch through to ``node_id``, signalled by ``signaller`` (a link
        of ours). Raises :class:`Unreachable`, or the signaller's refusal
        (an RPC error); the caller's scope bounds it."""
        existing = self.get(node_id)
        if existing is not None:
            await trio.lowlevel.checkpoint()
            return existing
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        address = await request_signal(signaller.rpc, self.identity, node_id)
        self.punched_dials += 1
        try:
            link = await self._network._handshake(
                self._node,
                node_id,
                (address.as_tuple(),),
                ConnectionPath.PUNCHED,
                punch=True,
            )
        except Unreachable:
            self.punched_dial_failures += 1
            raise
        existing = self.get(node_id)
        if existing is not None and existing is not link:
            # Another way got there meanwhile: keep one.
            self._network._close_wire(link.wire)
            return existing
        return link

    async def connect_relayed(self, node_id: NodeId, relay: SimLink) -> SimLink:
        """Connect to ``node_id`` through the node at the other end of
        ``relay`` (a link of ours). Raises :class:`Unreachable`."""
        existing = self.get(node_id)
        if existing is not None:
            await trio.lowlevel.checkpoint()
            return existing
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        self.relayed_dials += 1
        try:
            return await self._network._relay(self._node, node_id, relay)
        except Unreachable:
            self.relayed_dial_failures += 1
            raise

    # -- packets ------------------------------------------------------------------

    def _receive(self, src: Address, packet: Packet) -> None:
        node = self._node
        if isinstance(packet, Initial):
            attempt = packet.attempt
            ok = attempt.node_id == node.node_id
            self._network._send(node, src, Answer(attempt, node, src, ok))
        elif isinstance(packet, Answer):
            if packet.attempt.dialler is node:
                packet.attempt.answered(src, packet.target, packet.seen, packet.ok)
        elif isinstance(packet, Refused):
            if packet.attempt.dialler is node:
                packet.attempt.fail(src, f"{format_host_port(*src)} refused")
        else:
            # Noise: a punch. Dial where it came from too, if it is the
            # host we are punching toward (its peer-reflexive address).
            for attempt in list(self._punch_attempts):
                if src[0] == attempt.host and src not in attempt.destinations:
                    attempt.destinations.add(src)
                    if attempt.nursery is not None:
                        attempt.nursery.start_soon(
                            self._network._resend, attempt, src, spray_delays(self._rng)
                        )

    # -- the SignalHost -----------------------------------------------------------------

    def live_connection(self, node_id: NodeId) -> SimLink | None:
        return self.get(node_id)

    def now(self) -> float:
        return trio.current_time()

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        if self._node.nursery is not None:
            self._node.nursery.start_soon(self._forward, target, params)

    async def _forward(self, target: NodeId, params: JSONObject) -> None:
        with trio.move_on_after(self._network.rpc_timeout):
            link = self.get(target)
            if link is None:
                self.signal_failures += 1
                return
            try:
                await link.rpc.unary(SIGNAL_FINAL, params)
            except Exception:
                self.signal_failures += 1  # fire and forget
                return
            self.signals_forwarded += 1

    def punch(self, request: SignalRequest) -> None:
        key = request.address.as_tuple()
        if self._node.nursery is None or key in self._punching:
            return
        self._punching.add(key)
        self.punches += 1
        self._node.nursery.start_soon(self._punch, request, key)

    async def _punch(self, request: SignalRequest, key: Address) -> None:
        try:
            with trio.move_on_after(PUNCH_DURATION):
                for delay in spray_delays(self._rng):
                    if self.get(request.source) is not None:
                        return  # its connection is here
                    self._network._send(self._node, key, Noise())
                    await trio.sleep(delay)
        finally:
            self._punching.discard(key)
