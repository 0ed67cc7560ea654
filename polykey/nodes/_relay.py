"""Relayed connections, end to end: where no punch gets through.

Theory of operation
-------------------
A symmetric NAT facing a port-restricted or symmetric one cannot be
punched: each side's packets go to a port the other side's NAT never opened
for it. Polykey has no answer to that; we relay, the way libp2p's circuit
relay v2 does, but end to end: the relayed connection is an ordinary QUIC
connection between the two nodes, mutually verified by NodeId like any
other, whose packets travel inside the connections each holds to the relay.
The relay forwards ciphertext it can neither read nor forge.

1. **Reservation.** Node B, behind a NAT, holds a connection to a relay R
   (one of its seeds) and calls ``R.nodesRelayReserve({})``. R grants it
   only to a node connected to it, within its limits; a reservation expires
   (``reservation_ttl``) unless renewed. Result ``{"expiresMs"}``.
2. **Circuit.** Node A calls ``R.nodesRelayConnect({"targetNodeIdEncoded":
   B})``. R checks B's reservation and its circuit limits, picks two random
   8-byte circuit ids, and calls ``B.nodesRelayStop({"sourceNodeIdEncoded":
   A, "circuit": id_B})``: B opens a virtual path for ``id_B`` on its
   connection to R. R then answers A ``{"circuit": id_A, "durationMs",
   "bytes", "maxPacket"}``, the last the largest inner packet that fits in
   one DATAGRAM with the circuit id on both of R's connections. Circuit ids
   are base64url on the wire.
3. **Packets.** A opens a virtual path for ``id_A`` on its connection to R
   (:meth:`polykey.quic.QUICSocket.open_virtual_path`) and dials B's NodeId
   at it. Each QUIC packet of the inner connection travels as one DATAGRAM
   frame (RFC 9221) ``circuit id || packet``; R swaps the id and forwards
   (in C, :meth:`polykey.quic.QUICConnection.forward_datagrams`, within the
   circuit's byte budget; the table hears what went after each batch).
   B's QUIC server accepts the inner connection like any other. Inner
   packets are at most ``maxPacket`` bytes (A announces that as its largest
   UDP payload, which bounds B's packets too; never under QUIC's minimum of
   1200), so they fit in one outer datagram.
4. **Limits**, per :class:`RelayLimits`: reservations (in all, per IP),
   circuits (in all, per node), and per circuit a duration and a byte budget
   each way. A circuit past its budget is closed: R tells each end with an
   empty datagram on the circuit, and the ends close the inner connection.
5. **Upgrade.** The node that dialled through the relay keeps trying to
   punch (R is connected to both, so it can signal); when a punch succeeds
   the punched connection takes the relayed one's place in the pool.

The tables here are pure (time is an argument); the connection manager
drives them and carries the datagrams (its part
:class:`~polykey.nodes._relaying.Relaying`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Protocol, TypeVar

import attrs

from ..keys import NodeId
from ..rpc import CallContext, JSONObject, JSONValue, RPCInvalidParams, UnaryHandler
from ._signalling import (
    NodeIdMissingError,
    SignalError,
    caller_node_id,
)
from ._wire import (
    CIRCUIT_ID_LEN,
    CircuitId,
    Count,
    Millis,
    PacketSize,
    RelayConnectAnswer,
    RelayConnectParams,
    RelayReserveAnswer,
    RelayStopParams,
    WireError,
    converter,
    structure,
)

__all__ = [
    "CIRCUIT_ID_LEN",
    "RELAY_CONNECT",
    "RELAY_RESERVE",
    "RELAY_STOP",
    "Circuit",
    "NoReservationError",
    "NodesRelayConnect",
    "NodesRelayReserve",
    "NodesRelayStop",
    "PermissionDeniedError",
    "RelayConnectionFailedError",
    "RelayError",
    "RelayHost",
    "RelayLimits",
    "RelayMalformedError",
    "RelayStatistics",
    "RelayTable",
    "ReservationRefusedError",
    "ResourceLimitError",
    "relay_answer",
    "relay_handlers",
]

RELAY_RESERVE: Final = "nodesRelayReserve"
RELAY_CONNECT: Final = "nodesRelayConnect"
RELAY_STOP: Final = "nodesRelayStop"

T = TypeVar("T")


class RelayError(SignalError):
    """A relay request refused (circuit relay v2's status codes)."""

    exit_code = 75  # sysexits EX_TEMPFAIL


class ReservationRefusedError(RelayError):
    wire_type = "ErrorRelayReservationRefused"
    description = "The relay does not offer relaying"


class ResourceLimitError(RelayError):
    wire_type = "ErrorRelayResourceLimitExceeded"
    description = "A relay limit was reached"


class PermissionDeniedError(RelayError):
    wire_type = "ErrorRelayPermissionDenied"
    description = "Not permitted on this relay"
    exit_code: ClassVar[int] = 77  # EX_NOPERM


class RelayConnectionFailedError(RelayError):
    wire_type = "ErrorRelayConnectionFailed"
    description = "The relay could not reach the target"


class NoReservationError(RelayError):
    wire_type = "ErrorRelayNoReservation"
    description = "The target holds no reservation on this relay"


class RelayMalformedError(RelayError):
    wire_type = "ErrorRelayMalformed"
    description = "Malformed relay message"
    exit_code: ClassVar[int] = 65  # EX_DATAERR


@attrs.frozen(kw_only=True)
class RelayLimits:
    """What one relay allows. Defaults suit a seed on a small VM; the byte
    budget is generous enough to use a relayed connection, not to move
    bulk data through it for long (circuit relay v2's 2 min / 128 KiB are
    meant only for upgrading)."""

    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    reservation_ttl: float = 3600.0
    max_circuits: int = 128
    max_circuits_per_node: int = 16
    circuit_duration: float = 600.0
    #: Bytes each way, per circuit.
    circuit_bytes: int = 64 * 1024 * 1024


@attrs.define
class _Reservation:
    expires: float
    ip: str


@attrs.define(eq=False)
class Circuit:
    """One relayed circuit between ``source`` and ``target``."""

    source: NodeId
    target: NodeId
    source_id: bytes
    target_id: bytes
    opened: float
    expires: float
    #: Bytes forwarded toward the target and toward the source.
    to_target: int = 0
    to_source: int = 0
    closed: bool = False
    #: The largest inner packet both of the relay's connections carry in one
    #: DATAGRAM with the circuit id (None: not known, QUIC's 1200 bytes).
    max_packet: int | None = None


@attrs.define
class RelayStatistics:
    reservations: int = 0
    reservations_refused: int = 0
    circuits: int = 0
    circuits_opened: int = 0
    circuits_refused: int = 0
    circuits_over_budget: int = 0
    circuits_expired: int = 0
    datagrams_forwarded: int = 0
    bytes_forwarded: int = 0
    datagrams_dropped: int = 0


class RelayTable:
    """Reservations and circuits of a relay. Pure: ``now`` is an argument,
    randomness comes from ``token``."""

    def __init__(
        self,
        limits: RelayLimits | None = None,
        *,
        token: Callable[[int], bytes] = os.urandom,
        on_close: Callable[[Circuit], None] | None = None,
    ) -> None:
        self.limits = limits or RelayLimits()
        self._token = token
        #: Called with each circuit as it closes, however it does.
        self.on_close = on_close
        self._reservations: dict[NodeId, _Reservation] = {}
        # (the node a datagram comes from, its circuit id) -> circuit
        self._ends: dict[tuple[NodeId, bytes], Circuit] = {}
        self._per_node: dict[NodeId, int] = {}
        self.statistics = RelayStatistics()

    # -- reservations ------------------------------------------------------------

    def reserve(self, node_id: NodeId, ip: str, now: float) -> float:
        """Grant or renew ``node_id``'s reservation; returns when it expires.
        Raises ResourceLimitError."""
        self.expire(now)
        limits = self.limits
        if node_id not in self._reservations:
            same_ip = sum(1 for r in self._reservations.values() if r.ip == ip)
            if (
                len(self._reservations) >= limits.max_reservations
                or same_ip >= limits.max_reservations_per_ip
            ):
                self.statistics.reservations_refused += 1
                raise ResourceLimitError("no reservation left on this relay")
        expires = now + limits.reservation_ttl
        self._reservations[node_id] = _Reservation(expires, ip)
        self.statistics.reservations = len(self._reservations)
        return expires

    def has_reservation(self, node_id: NodeId, now: float) -> bool:
        reservation = self._reservations.get(node_id)
        return reservation is not None and reservation.expires > now

    def drop_node(self, node_id: NodeId) -> list[Circuit]:
        """``node_id``'s connection is gone: its reservation and circuits
        end. Returns the circuits closed."""
        self._reservations.pop(node_id, None)
        self.statistics.reservations = len(self._reservations)
        closed = [c for c in self.circuits() if node_id in (c.source, c.target)]
        for circuit in closed:
            self.close(circuit)
        return closed

    # -- circuits ----------------------------------------------------------------

    def open(self, source: NodeId, target: NodeId, now: float) -> Circuit:
        """A new circuit from ``source`` to ``target``; raises
        NoReservationError, ResourceLimitError or PermissionDeniedError."""
        self.expire(now)
        limits = self.limits
        if source == target:
            raise PermissionDeniedError("a node does not relay to itself")
        if not self.has_reservation(target, now):
            self.statistics.circuits_refused += 1
            raise NoReservationError("the target holds no reservation here")
        if (
            self.statistics.circuits >= limits.max_circuits
            or self._per_node.get(source, 0) >= limits.max_circuits_per_node
            or self._per_node.get(target, 0) >= limits.max_circuits_per_node
        ):
            self.statistics.circuits_refused += 1
            raise ResourceLimitError("circuit limit reached")
        token = self._token
        circuit = Circuit(
            source=source,
            target=target,
            source_id=token(CIRCUIT_ID_LEN),
            target_id=token(CIRCUIT_ID_LEN),
            opened=now,
            expires=now + limits.circuit_duration,
        )
        self._ends[source, circuit.source_id] = circuit
        self._ends[target, circuit.target_id] = circuit
        for node in (source, target):
            self._per_node[node] = self._per_node.get(node, 0) + 1
        self.statistics.circuits += 1
        self.statistics.circuits_opened += 1
        return circuit

    def route(
        self, sender: NodeId, circuit_id: bytes, size: int, now: float
    ) -> tuple[NodeId, bytes] | Circuit | None:
        """Where a datagram of ``size`` payload bytes from ``sender`` on
        ``circuit_id`` goes: ``(node, its circuit id)``; the Circuit itself
        when it has just run out of time or bytes (the caller tells both
        ends and it is closed); None for an unknown circuit (dropped)."""
        circuit = self._ends.get((sender, circuit_id))
        if circuit is None:
            self.statistics.datagrams_dropped += 1
            return None
        if now >= circuit.expires:
            self.statistics.circuits_expired += 1
            self.close(circuit)
            return circuit
        if sender == circuit.source:
            circuit.to_target += size
            spent, out = circuit.to_target, (circuit.target, circuit.target_id)
        else:
            circuit.to_source += size
            spent, out = circuit.to_source, (circuit.source, circuit.source_id)
        if spent > self.limits.circuit_bytes:
            self.statistics.circuits_over_budget += 1
            self.close(circuit)
            return circuit
        self.statistics.datagrams_forwarded += 1
        self.statistics.bytes_forwarded += size
        return out

    def account(
        self,
        circuit: Circuit,
        sender: NodeId,
        datagrams: int,
        size: int,
        dropped: int,
        now: float,
    ) -> bool:
        """``datagrams`` of ``size`` payload bytes in all that were forwarded
        from ``sender`` on ``circuit`` without :meth:`route` (the caller's
        fast path, which stays within :meth:`budget_left`), ``dropped`` of
        them by the next hop. Closes the circuit if it has run out of time;
        returns whether it is still open."""
        if sender == circuit.source:
            circuit.to_target += size
        else:
            circuit.to_source += size
        stats = self.statistics
        stats.datagrams_forwarded += datagrams
        stats.bytes_forwarded += size
        stats.datagrams_dropped += dropped
        if not circuit.closed and now >= circuit.expires:
            stats.circuits_expired += 1
            self.close(circuit)
        return not circuit.closed

    def budget_left(self, circuit: Circuit, sender: NodeId) -> int:
        """Payload bytes ``sender`` may still send on ``circuit``."""
        spent = circuit.to_target if sender == circuit.source else circuit.to_source
        return max(0, self.limits.circuit_bytes - spent)

    def close(self, circuit: Circuit) -> None:
        if circuit.closed:
            return
        circuit.closed = True
        self._ends.pop((circuit.source, circuit.source_id), None)
        self._ends.pop((circuit.target, circuit.target_id), None)
        for node in (circuit.source, circuit.target):
            left = self._per_node.get(node, 1) - 1
            if left:
                self._per_node[node] = left
            else:
                self._per_node.pop(node, None)
        self.statistics.circuits -= 1
        if self.on_close is not None:
            self.on_close(circuit)

    def circuits(self) -> Iterator[Circuit]:
        seen: set[int] = set()
        for circuit in list(self._ends.values()):
            if id(circuit) not in seen:
                seen.add(id(circuit))
                yield circuit

    def expire(self, now: float) -> list[Circuit]:
        """Forget expired reservations; close expired circuits (returned)."""
        for node_id in [n for n, r in self._reservations.items() if r.expires <= now]:
            del self._reservations[node_id]
        self.statistics.reservations = len(self._reservations)
        done = [c for c in self.circuits() if c.expires <= now]
        for circuit in done:
            self.statistics.circuits_expired += 1
            self.close(circuit)
        return done


# -- the handlers ---------------------------------------------------------------------


def relay_answer(value: object, cls: type[T]) -> T:
    """A relay's answer to one of our requests (a
    :class:`~polykey.nodes._wire.RelayReserveAnswer` or
    :class:`~polykey.nodes._wire.RelayConnectAnswer`), through the
    converter; raises :class:`RelayMalformedError` naming the key."""
    try:
        return structure(value, cls, at="answer")
    except WireError as exc:
        raise RelayMalformedError(f"the relay's {exc}") from None


class RelayHost(Protocol):
    """What the relay handlers need of the node (its connection manager)."""

    def relay_reserve(self, node_id: NodeId, ip: str) -> float:
        """Grant ``node_id`` a reservation; returns seconds until it expires."""

    async def relay_connect(self, source: NodeId, target: NodeId) -> Circuit:
        """Open a circuit from ``source`` to ``target`` (asking the target)."""

    def relay_stop(self, relay: NodeId, source: NodeId, circuit_id: bytes) -> None:
        """We are the target of a circuit through ``relay``: open its path."""


def _caller(ctx: CallContext) -> NodeId:
    caller = caller_node_id(ctx)
    if caller is None:
        raise NodeIdMissingError()
    return caller


def _params(params: JSONValue, cls: type[T]) -> T:
    # A bad circuit id is the relay's own kind of malformed; the rest is
    # what any handler answers for params it cannot use.
    try:
        return structure(params, cls)
    except WireError as exc:
        if exc.key == "circuit":
            raise RelayMalformedError(str(exc)) from None
        raise RPCInvalidParams(str(exc)) from None


class NodesRelayReserve(UnaryHandler[JSONValue, JSONObject]):
    """Step 1 (relay side): a reservation for the caller."""

    def __init__(self, host: RelayHost) -> None:
        self.host = host

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONObject:
        ttl = self.host.relay_reserve(_caller(ctx), str(ctx.transport.get("host")))
        answer: JSONObject = converter.unstructure(
            RelayReserveAnswer(Millis(round(ttl * 1000)))
        )
        return answer


class NodesRelayConnect(UnaryHandler[JSONValue, JSONObject]):
    """Step 2 (relay side): a circuit from the caller to the target."""

    def __init__(self, host: RelayHost, limits: RelayLimits) -> None:
        self.host = host
        self.limits = limits

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONObject:
        source = _caller(ctx)
        target = _params(params, RelayConnectParams).target
        circuit = await self.host.relay_connect(source, target)
        limits = self.limits
        shape = RelayConnectAnswer(
            circuit=CircuitId(circuit.source_id),
            duration_ms=Millis(round(limits.circuit_duration * 1000)),
            bytes=Count(limits.circuit_bytes),
            max_packet=(
                None if circuit.max_packet is None else PacketSize(circuit.max_packet)
            ),
        )
        answer: JSONObject = converter.unstructure(shape)
        return answer


class NodesRelayStop(UnaryHandler[JSONValue, JSONObject]):
    """Step 2 (target side): the relay opens a circuit to us."""

    def __init__(self, host: RelayHost) -> None:
        self.host = host

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONObject:
        relay = _caller(ctx)
        p = _params(params, RelayStopParams)
        self.host.relay_stop(relay, p.source, p.circuit)
        return {}


def relay_handlers(host: RelayHost, limits: RelayLimits | None) -> dict[str, Any]:
    """The relay methods: ``nodesRelayStop`` always (any node may be a
    circuit's target), the relay's own two only with ``limits`` (relaying
    on)."""
    handlers: dict[str, Any] = {RELAY_STOP: NodesRelayStop(host)}
    if limits is not None:
        handlers[RELAY_RESERVE] = NodesRelayReserve(host)
        handlers[RELAY_CONNECT] = NodesRelayConnect(host, limits)
    return handlers
