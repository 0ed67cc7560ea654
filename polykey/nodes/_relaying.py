"""Relaying, both roles: a relay for others, and an end of circuits.

Theory of operation
-------------------
The protocol is :mod:`polykey.nodes._relay`'s; its tables are pure, and
:class:`Relaying` drives them and carries the datagrams. Every pooled
connection hands its DATAGRAM frames to :meth:`Relaying.datagram`, each
``circuit id || payload``:

- **An end.** A circuit we are an end of is a virtual path on our
  connection to the relay (:meth:`polykey.quic.QUICSocket.open_virtual_path`),
  known by ``(relay, circuit id)`` and by the path's address: a datagram on
  it is a packet of the inner connection, an empty one says the relay
  closed the circuit. The inner connection is an ordinary one, verified end
  to end, whose packets are at most the circuit's ``maxPacket`` (or
  :data:`RELAYED_PAYLOAD`) bytes so that they fit in one datagram; the
  manager pools it as ``relayed`` (whatever arrives at a circuit's path is)
  and never reports its address, which means something on this socket
  only. The source's end is opened by
  :meth:`Relaying.connect`; the target's by :meth:`Relaying.relay_stop`
  (only on a relay we hold a reservation on), which lets go of it when no
  inner connection arrived within :data:`_CIRCUIT_WAIT`.
- **A relay.** With limits to relay within, we grant reservations to the
  nodes connected to us (in mode "auto", only while no peer has seen us
  behind a NAT), open circuits between a source and a reserved target
  (asking the target first), and route each datagram to the circuit's
  other end; a circuit past its limits is closed with an empty datagram to
  both ends.
- **Endings.** When a connection ends, so do the circuits through it: ours
  on it (their inner connections are closed), the one it is the inner
  connection of, those we relay for its node, and our reservation on it.

The relayed connection's upgrade to a punched one is the puncher's
(:meth:`polykey.nodes._punching.Puncher.upgrade`); a :class:`Relaying`
reaches the pool only through the manager's methods.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ..keys import NodeId
from ..quic import (
    Address,
    DatagramForward,
    QUICClient,
    QUICConfig,
    QUICConnectionError,
    TLSIdentity,
    VirtualPath,
    node_verifier,
)
from ._connection import (
    ConnectionPath,
    NodeConnection,
    NodeConnectionError,
)
from ._failures import note_failure
from ._relay import (
    CIRCUIT_ID_LEN,
    RELAY_CONNECT,
    RELAY_RESERVE,
    RELAY_STOP,
    Circuit,
    PermissionDeniedError,
    RelayConnectionFailedError,
    RelayLimits,
    RelayMalformedError,
    RelayTable,
    ReservationRefusedError,
    relay_answer,
)
from ._wire import (
    CircuitId,
    RelayConnectAnswer,
    RelayConnectParams,
    RelayReserveAnswer,
    RelayStopParams,
    converter,
)

if TYPE_CHECKING:
    from ._connections import NodeConnectionManager

__all__ = ["RELAYED_PAYLOAD", "Relaying"]

# The manager's logger: what the parts log reads as the manager's.
log = logging.getLogger("polykey.nodes.connections")

#: Inner packets of a relayed connection when the relay names no larger
#: size: QUIC's minimum, so that with the circuit id they fit in one
#: DATAGRAM of the connection to the relay.
RELAYED_PAYLOAD: Final = 1200
#: A circuit's target waits this long for the inner connection to arrive.
_CIRCUIT_WAIT: Final = 30.0


class Relaying:
    """The relaying of ``manager``'s node: ``limits`` to relay for others
    within (None: we relay for nobody), and ``mode`` ("auto" grants
    reservations only while no peer has seen us behind a NAT; "on"
    always). Its own client dials inner connections (``tls``, ``config``:
    the manager's)."""

    def __init__(
        self,
        manager: NodeConnectionManager,
        tls: TLSIdentity,
        config: QUICConfig,
        limits: RelayLimits | None,
        mode: str,
    ) -> None:
        self._manager = manager
        self._tls = tls
        self._config = config
        # Clients that dial inner connections, by their largest packet.
        self._clients: dict[int, QUICClient] = {}
        # The table when we relay for others; our circuit ends, by (relay,
        # circuit id) and by the virtual address of their path.
        self.table = (
            RelayTable(limits, on_close=self._unforward) if limits is not None else None
        )
        # The relay's fast lanes: per open circuit, its forward each way.
        self._forwards: dict[Circuit, list[DatagramForward]] = {}
        self.mode = mode
        self._ends: dict[tuple[NodeId, bytes], VirtualPath] = {}
        self._end_of: dict[Address, tuple[NodeId, bytes]] = {}
        self._reserved_with: set[NodeId] = set()
        self.relayed_dials = 0
        self.relayed_dial_failures = 0

    # -- datagrams and circuit ends ---------------------------------------------

    def datagram(self, sender: NodeId, data: bytes) -> None:
        """A DATAGRAM frame from ``sender``: for a circuit we are an end of,
        or one we relay."""
        circuit_id, payload = data[:CIRCUIT_ID_LEN], data[CIRCUIT_ID_LEN:]
        end = self._ends.get((sender, circuit_id))
        if end is not None:
            if payload:
                end.deliver(payload)
            else:  # the relay closed the circuit
                self._close_end((sender, circuit_id))
            return
        table = self.table
        if table is None or len(circuit_id) < CIRCUIT_ID_LEN:
            return
        out = table.route(sender, circuit_id, len(payload), trio.current_time())
        if out is None:
            return
        if isinstance(out, Circuit):
            self._circuit_closed(out)
            return
        node, out_id = out
        pooled = self._manager.pooled(node)
        if pooled is None or not pooled.connection.send_datagram(out_id + payload):
            table.statistics.datagrams_dropped += 1

    def is_end(self, address: tuple[object, ...]) -> bool:
        """Whether ``address`` is the path of a circuit we are an end of
        (a connection there is relayed)."""
        return address in self._end_of

    def _circuit_closed(self, circuit: Circuit) -> None:
        # An empty datagram on a circuit tells its end that it is over.
        for node, circuit_id in (
            (circuit.source, circuit.source_id),
            (circuit.target, circuit.target_id),
        ):
            pooled = self._manager.pooled(node)
            if pooled is not None:
                pooled.connection.send_datagram(circuit_id)

    def _open_end(self, relay: NodeConnection, circuit_id: bytes) -> VirtualPath:
        path = self._manager.socket.open_virtual_path(
            carrier=relay.connection, prefix=circuit_id
        )
        self._ends[relay.node_id, circuit_id] = path
        self._end_of[path.address] = (relay.node_id, circuit_id)
        return path

    def _close_end(self, key: tuple[NodeId, bytes]) -> None:
        path = self._ends.pop(key, None)
        if path is None:
            return
        self._end_of.pop(path.address, None)
        path.close()
        for node in self._manager.pooled_at(path.address):
            node.connection.close(0, b"circuit closed")

    def connection_gone(self, node: NodeConnection) -> None:
        """``node``'s connection ended: the circuits through it end too."""
        end = self._end_of.get(node.connection.remote_address)
        if end is not None:
            self._close_end(end)  # an inner (relayed) connection
        pooled = self._manager.pooled(node.node_id)
        if pooled is not None and pooled is not node and not pooled.connection.closed:
            # A second connection to that node (a dial race's, a dial-back's)
            # ended; the node's circuits and reservation go over the pooled one.
            return
        for key in [k for k in self._ends if k[0] == node.node_id]:
            self._close_end(key)
        if self.table is not None:
            for circuit in self.table.drop_node(node.node_id):
                self._circuit_closed(circuit)
        self._reserved_with.discard(node.node_id)

    # -- the relay's handlers' host (RelayHost) ---------------------------------

    def relay_reserve(self, node_id: NodeId, ip: str) -> float:
        table = self.table
        if table is None or (self.mode == "auto" and self._manager.behind_nat()):
            raise ReservationRefusedError("this node does not relay")
        if self._manager.get(node_id) is None:
            raise PermissionDeniedError("reservations are for connected nodes")
        now = trio.current_time()
        return table.reserve(node_id, ip, now) - now

    async def relay_connect(self, source: NodeId, target: NodeId) -> Circuit:
        table = self.table
        if table is None:
            raise ReservationRefusedError("this node does not relay")
        to_target = self._manager.get(target)
        if to_target is None:
            raise RelayConnectionFailedError("no connection to the target")
        circuit = table.open(source, target, trio.current_time())
        # The largest inner packet that fits, with the id, both ways.
        from_source = self._manager.pooled(source)
        room_in = from_source.connection.datagram_max_size() if from_source else None
        room_out = to_target.connection.datagram_max_size()
        if room_in is not None and room_out is not None:
            circuit.max_packet = min(room_in, room_out) - CIRCUIT_ID_LEN
        try:
            with trio.fail_after(
                self._manager.attempt_timeout(self._manager.rpc_timeout)
            ):
                await to_target.rpc.unary(
                    RELAY_STOP,
                    converter.unstructure(
                        RelayStopParams(source, CircuitId(circuit.target_id))
                    ),
                )
        except (Exception, trio.TooSlowError) as exc:
            table.close(circuit)
            raise RelayConnectionFailedError(f"the target refused: {exc}") from None
        self._forward(circuit)
        return circuit

    def _forward(self, circuit: Circuit) -> None:
        # Each way, the circuit's datagrams are forwarded in C within what
        # is left of its budget; one past it (or any from a connection that
        # is not pooled) reaches datagram() and the table's route().
        table = self.table
        assert table is not None
        ends = (
            (circuit.source, circuit.source_id, circuit.target, circuit.target_id),
            (circuit.target, circuit.target_id, circuit.source, circuit.source_id),
        )
        forwards: list[DatagramForward] = []
        for sender, sender_id, receiver, receiver_id in ends:
            inbound, outbound = (
                self._manager.pooled(sender),
                self._manager.pooled(receiver),
            )
            if inbound is None or outbound is None or circuit.closed:
                continue
            try:
                forward = inbound.connection.forward_datagrams(
                    sender_id,
                    outbound.connection,
                    receiver_id,
                    budget=table.budget_left(circuit, sender),
                    on_forwarded=functools.partial(self._forwarded, circuit, sender),
                )
            except ValueError:
                # The id is routed on that connection already (one of our
                # own circuit ends through the sender, its id chosen by
                # the sender): this way stays on the slow path.
                continue
            forwards.append(forward)
        self._forwards[circuit] = forwards

    def _forwarded(
        self, circuit: Circuit, sender: NodeId, datagrams: int, size: int, dropped: int
    ) -> None:
        # A batch went by in C: account it; past its time, the circuit ends.
        table = self.table
        assert table is not None
        if not table.account(
            circuit, sender, datagrams, size, dropped, trio.current_time()
        ):
            self._circuit_closed(circuit)

    def _unforward(self, circuit: Circuit) -> None:
        for forward in self._forwards.pop(circuit, ()):
            forward.close()

    def relay_stop(self, relay: NodeId, source: NodeId, circuit_id: bytes) -> None:
        conn = self._manager.get(relay)
        if relay not in self._reserved_with or conn is None:
            raise PermissionDeniedError("no reservation of ours on that relay")
        if (relay, circuit_id) in self._ends:
            raise RelayMalformedError("that circuit is open already")
        path = self._open_end(conn, circuit_id)
        self._manager.spawn(self._expect_circuit, (relay, circuit_id), path)
        log.debug("circuit from %s through %s", source, relay)

    async def _expect_circuit(
        self, key: tuple[NodeId, bytes], path: VirtualPath
    ) -> None:
        # The target's end: if the inner connection never comes, let go.
        await trio.sleep(_CIRCUIT_WAIT)
        if not self._manager.pooled_at(path.address):
            self._close_end(key)

    # -- using relays -------------------------------------------------------------

    async def reserve(self, relay: NodeConnection) -> float | None:
        """:meth:`NodeConnectionManager.reserve`."""
        try:
            result = await relay.rpc.unary(RELAY_RESERVE, {})
            # A relay whose answer we cannot read has not reserved for us:
            # its circuits are refused as any unknown relay's.
            answer = relay_answer(result, RelayReserveAnswer)
        except Exception as exc:
            if not note_failure(log, "reservation on", relay.node_id, exc):
                self._manager.task_errors += 1
            return None
        self._reserved_with.add(relay.node_id)
        return answer.expires_ms / 1000

    def _packet_size(self, relay: NodeConnection, named: int | None) -> int:
        # The relay's maxPacket, within what our own connection to it
        # carries and our configured largest packet; bigger packets are
        # fewer packets, each handled three times on the way.
        size = self._config.max_udp_payload_size
        room = relay.connection.datagram_max_size()
        if named is None or room is None:
            return RELAYED_PAYLOAD
        return max(RELAYED_PAYLOAD, min(size, named, room - CIRCUIT_ID_LEN))

    async def connect(self, node_id: NodeId, relay: NodeConnection) -> NodeConnection:
        """:meth:`NodeConnectionManager.connect_relayed`, but for the
        upgrade (which the manager starts)."""
        if node_id == self._manager.node_id:
            raise ValueError("a node does not connect to itself")
        self.relayed_dials += 1
        started = trio.current_time()
        result = await relay.rpc.unary(
            RELAY_CONNECT, converter.unstructure(RelayConnectParams(node_id))
        )
        answer = relay_answer(result, RelayConnectAnswer)
        circuit_id = answer.circuit
        size = self._packet_size(relay, answer.max_packet)
        client = self._clients.get(size)
        if client is None:
            client = self._clients[size] = QUICClient(
                self._manager.socket,
                self._tls,
                config=attrs.evolve(self._config, max_udp_payload_size=size),
            )
        path = self._open_end(relay, circuit_id)
        try:
            conn = await client.connect(path.address, verifier=node_verifier(node_id))
        except BaseException as exc:
            self.relayed_dial_failures += 1
            self._close_end((relay.node_id, circuit_id))
            if isinstance(exc, QUICConnectionError):
                raise NodeConnectionError(
                    exc.close_reason, f"{node_id}: {exc}"
                ) from exc
            raise
        return await self._manager.adopt_dialled(
            conn, path=ConnectionPath.RELAYED, started=started
        )
