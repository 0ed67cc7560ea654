"""Connections between nodes: one QUIC socket, a pool keyed by NodeId.

:class:`NodeConnectionManager` dials and accepts QUIC connections on the
node's one shared socket (the only way hole punching can work), verifies
every peer's node certificate chain (pinned to the NodeId it dialled, for
outgoing ones), and keeps at most one pooled connection per NodeId. Every
connection, whichever side opened it, serves the node's RPC methods on the
streams the peer opens, so RPC runs both ways over one connection.

A connection unused for its TTL is closed (60 s by default; ``ttl_for`` may
give longer ones: the agent uses :func:`sticky_ttl`, Polykey's 60 s rising
to 2 h for close buckets). Dialling is bounded: concurrent
dials to one NodeId share one attempt (a dial started while a punch is
being signalled or dialled waits for it), and at most ``max_dials`` run at
once.
Every verified connection is reported to ``on_connection`` with the address
the peer was seen at, which is how the node graph learns of it.

Hole punching (see :mod:`polykey.nodes.signalling` for the protocol) has
both halves here, since both use the one socket: :meth:`connect_punched`
asks a signaller to signal the target and dials it (re-sending the first
Initial at short intervals, and dialling too wherever the target's punch
packets come from), and :meth:`punch` sprays noise toward a node that asked
us through a signaller. The manager is the signalling handlers'
:class:`~polykey.nodes.signalling.SignalHost`. Each connection records the
path it took: ``direct``, or ``punched`` when a punch made it.

Deadlines of single attempts follow what the network shows:
:meth:`attempt_timeout` is a multiple of the dial times seen recently
(within bounds), so a dead node costs a lookup a fraction of a second on a
fast network instead of Polykey's 15 s.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
import math
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import trio

from ..keys import NodeId, NodeIdentity, bucket_index
from ..quic import (
    CloseKind,
    CloseReason,
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICConnectionError,
    QUICServer,
    QUICSocket,
    VirtualPath,
    node_tls_identity,
    node_verifier,
    spray_delays,
)
from ..rpc import JSONObject, RPCClient, RPCServer
from ._address import NodeAddress, format_host_port
from ._attempts import DEFAULT_ATTEMPT_TIMEOUT as DEFAULT_ATTEMPT_TIMEOUT
from ._attempts import MIN_ATTEMPT_TIMEOUT as MIN_ATTEMPT_TIMEOUT
from ._attempts import AttemptTimer
from .errors import InvalidAddressError, NodesError
from .handlers import PING
from .relay import (
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
    decode_circuit_id,
)
from .signalling import SIGNAL_FINAL, SignalRequest, b64url_encode, request_signal

__all__ = [
    "ConnectionPath",
    "NodeConnection",
    "NodeConnectionError",
    "NodeConnectionManager",
    "sticky_ttl",
]

log = logging.getLogger("polykey.nodes.connections")

Address = tuple[str, int]
#: Called with (node_id, host, port) for every verified connection.
ConnectionCallback = Callable[[NodeId, str, int], Awaitable[None] | None]

_CLOSE_TTL = 0x1  # application code: closed after the TTL expired
_CLOSE_STOPPING = 0x2  # application code: the node is stopping
_CLOSE_DUPLICATE = 0x3  # application code: a second connection of a race

#: How long a punch toward one address goes on (Polykey's target: 15 s).
PUNCH_DURATION: Final = 15.0
#: Punches running at once, in all and toward one host (Polykey: 3 per host).
MAX_PUNCHES: Final = 64
MAX_PUNCHES_PER_HOST: Final = 3
#: Signals forwarded at once (fire and forget); past it they are dropped.
MAX_FORWARDS: Final = 64
#: Bytes of noise per punch packet (Polykey sends 32 random bytes).
_PUNCH_BYTES: Final = 32


#: Inner packets of a relayed connection: QUIC's minimum, so that with the
#: circuit id they fit in one DATAGRAM of the connection to the relay.
RELAYED_PAYLOAD: Final = 1200
#: A circuit's target waits this long for the inner connection to arrive.
_CIRCUIT_WAIT: Final = 30.0
#: How long a replaced (relayed) connection lingers for calls in flight.
_REPLACED_GRACE: Final = 5.0
#: The first retry of a punch over a relayed connection, then doubling.
_UPGRADE_FIRST: Final = 5.0
_UPGRADE_MAX: Final = 300.0
#: Anchored connections (to seeds) are pinged this often: it renews the
#: peer's TTL of the connection, and tells us our reflexive address.
ANCHOR_PING_INTERVAL: Final = 25.0
#: Reflexive addresses remembered.
_MAX_REFLEXIVE: Final = 8


class ConnectionPath(enum.Enum):
    """How a connection came to be (in statistics, logs and the CLI)."""

    DIRECT = "direct"
    PUNCHED = "punched"
    RELAYED = "relayed"


def sticky_ttl(
    own_id: NodeId, node_id: NodeId, *, minimum: float = 60.0, scale: float = 7200.0
) -> float:
    """Polykey's idle TTL for a connection: 60 s for the farthest bucket,
    rising linearly to 60 s + 2 h for the closest (symmetric: both ends
    compute the same value)."""
    return minimum + (1 - bucket_index(own_id, node_id) / 255) * scale


class NodeConnectionError(QUICConnectionError, NodesError):
    """Dialling a node failed (unreachable, wrong identity, ...)."""

    @classmethod
    def unreachable(cls, node_id: NodeId) -> NodeConnectionError:
        return cls(
            CloseReason(CloseKind.LOCAL, reason=b"unreachable"),
            f"{node_id}: no address",
        )


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


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def display_address(address: tuple[Any, ...]) -> Address:
    """``(host, port)`` with IPv4-mapped IPv6 written as plain IPv4."""
    host = str(address[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(address[1])


@attrs.define(eq=False)
class NodeConnection:
    """A verified connection to ``node_id`` and the RPC client over it."""

    node_id: NodeId
    connection: QUICConnection
    rpc: RPCClient[Any]
    last_used: float
    outgoing: bool
    path: ConnectionPath = ConnectionPath.DIRECT
    #: When it was verified (trio time).
    since: float = 0.0
    #: When the attempt that made it began (trio time), for outgoing ones:
    #: the dial; for a punch, its signal request; for a relayed one, its
    #: circuit request. None for incoming connections.
    attempt_started: float | None = None

    @property
    def address(self) -> Address:
        return display_address(self.connection.remote_address)


class NodeConnectionManager:
    """Owns the node's QUIC server and client on ``socket``.

    Run it with ``await nursery.start(manager.run)``; leaving the nursery
    closes every connection.
    """

    def __init__(
        self,
        socket: QUICSocket,
        identity: NodeIdentity,
        rpc_server: RPCServer,
        *,
        config: QUICConfig | None = None,
        ttl: float = 60.0,
        ttl_for: Callable[[NodeId], float] | None = None,
        max_dials: int = 32,
        rpc_timeout: float = 15.0,
        on_connection: ConnectionCallback | None = None,
        relay: RelayLimits | None = None,
        relay_mode: str = "auto",
    ) -> None:
        """``relay``: the limits of relaying for others (None: we relay for
        nobody). ``relay_mode`` "auto" grants reservations only while no
        peer has seen us behind a NAT; "on" always."""
        self.socket = socket
        self.identity = identity
        self.node_id = identity.node_id
        self._rpc_server = rpc_server
        self._config = config or QUICConfig()
        tls = node_tls_identity(identity)
        self._server = QUICServer(
            socket, tls, config=self._config, verifier=node_verifier()
        )
        self._client = QUICClient(socket, tls, config=self._config)
        self._relayed_client = QUICClient(
            socket,
            tls,
            config=attrs.evolve(self._config, max_udp_payload_size=RELAYED_PAYLOAD),
        )
        self._ttl = ttl
        self._ttl_for = ttl_for
        self._dial_limit = trio.CapacityLimiter(max_dials)
        self._rpc_timeout = rpc_timeout
        self._on_connection = on_connection
        self._pool: dict[NodeId, NodeConnection] = {}
        self._dialling: dict[NodeId, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        # Punches we are sending, by (host, port); and the nodes they are
        # for, until their connection arrives (it is then "punched").
        self._punching: set[tuple[str, int]] = set()
        self._punch_hosts: dict[str, int] = {}
        self._awaiting_punch: dict[NodeId, float] = {}
        self._forwards = 0
        self._dial_times = AttemptTimer()
        # Relaying: the table when we relay for others; our circuit ends,
        # by (relay, circuit id) and by the virtual address of their path.
        self.relay_table = RelayTable(relay) if relay is not None else None
        self.relay_mode = relay_mode
        self._ends: dict[tuple[NodeId, bytes], VirtualPath] = {}
        self._end_of: dict[Address, tuple[NodeId, bytes]] = {}
        self._reserved_with: set[NodeId] = set()
        # Connections we keep (to seeds): never reaped, re-dialled when lost.
        self._anchored: set[NodeId] = set()
        # Where peers see us, most recent first.
        self.reflexive: list[tuple[str, int]] = []
        self.relayed_dials = 0
        self.relayed_dial_failures = 0
        self.upgrades = 0
        self.dials = 0
        self.dial_failures = 0
        self.punches = 0
        self.punches_refused = 0
        self.punched_dials = 0
        self.punched_dial_failures = 0
        self.signals_forwarded = 0
        self.signals_dropped = 0
        self.signal_failures = 0

    # -- running ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._accept_loop)
            nursery.start_soon(self._reaper)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._stopping = True
                self._close_all()
                nursery.cancel_scope.cancel()

    def _close_all(self) -> None:
        for node in list(self._pool.values()):
            node.connection.close(_CLOSE_STOPPING, b"node stopping")
        self._pool.clear()

    async def aclose(self) -> None:
        """Close every connection and stop accepting."""
        self._stopping = True
        self._close_all()
        await self._server.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _accept_loop(self) -> None:
        while True:
            try:
                conn = await self._server.accept()
            except trio.ClosedResourceError:
                return
            self._adopt(conn, outgoing=False)

    def _adopt(
        self,
        conn: QUICConnection,
        *,
        outgoing: bool,
        path: ConnectionPath = ConnectionPath.DIRECT,
        started: float | None = None,
    ) -> NodeConnection:
        node_id = conn.peer_identity
        assert isinstance(node_id, NodeId)
        now = trio.current_time()
        if conn.remote_address in self._end_of:
            path = ConnectionPath.RELAYED
        elif self._awaiting_punch.pop(node_id, 0.0) > now:
            path = ConnectionPath.PUNCHED  # it came through our punch
        node = NodeConnection(
            node_id=node_id,
            connection=conn,
            rpc=RPCClient(None, conn.open_stream, timeout=self._rpc_timeout),
            last_used=now,
            outgoing=outgoing,
            path=path,
            since=now,
            attempt_started=started,
        )
        # Keep the first connection per node; a second (both dialled at
        # once) still serves RPC until its TTL. But a relayed one gives way
        # to a direct or punched one, after a grace for calls in flight.
        pooled = self._pool.get(node_id)
        assert self._nursery is not None
        if pooled is None or pooled.connection.closed:
            self._pool[node_id] = node
        elif (
            pooled.path is ConnectionPath.RELAYED and path is not ConnectionPath.RELAYED
        ):
            self._pool[node_id] = node
            self.upgrades += 1
            log.info("%s: %s connection replaces the relayed one", node_id, path.value)
            self._nursery.start_soon(self._close_later, pooled)
        conn.on_datagram(functools.partial(self._datagram, node_id))
        self._nursery.start_soon(self._serve_connection, node)
        host, port = node.address
        log.info(
            "%s %s connection with %s at %s",
            "outgoing" if outgoing else "incoming",
            path.value,
            node_id,
            format_host_port(host, port),
        )
        # A relayed connection's address is a virtual path's, meaningful on
        # this socket only: the graph must not learn it, nor peers hear it.
        if self._on_connection is not None and path is not ConnectionPath.RELAYED:
            self._nursery.start_soon(self._report, node_id, host, port)
        return node

    async def _report(self, node_id: NodeId, host: str, port: int) -> None:
        assert self._on_connection is not None
        result = self._on_connection(node_id, host, port)
        if result is not None:
            await result

    async def _serve_connection(self, node: NodeConnection) -> None:
        conn = node.connection
        host, port = node.address
        meta: Mapping[str, Any] = {
            "node_id": node.node_id,
            "host": host,
            "port": port,
            "certificates": conn.peer_certificates,
        }
        try:
            while True:
                stream = await conn.accept_stream()
                node.last_used = trio.current_time()
                await self._rpc_server.handle_stream(stream, meta)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self._pool.get(node.node_id) is node:
                del self._pool[node.node_id]
            self._connection_gone(node)
            if not conn.closed:
                await conn.aclose()
            log.info("connection with %s ended: %s", node.node_id, conn.close_reason)

    def ttl_of(self, node_id: NodeId) -> float | None:
        """The idle TTL of the connection to ``node_id`` (None: kept)."""
        if node_id in self._anchored:
            return None
        return self._ttl_for(node_id) if self._ttl_for else self._ttl

    async def _reaper(self) -> None:
        """Close connections idle for longer than their TTL."""
        while True:
            await trio.sleep(max(1.0, self._ttl / 4))
            now = trio.current_time()
            for node_id, node in list(self._pool.items()):
                ttl = self.ttl_of(node_id)
                if ttl is not None and now - node.last_used > ttl:
                    del self._pool[node_id]
                    await node.connection.aclose(_CLOSE_TTL, b"idle")

    # -- dialling -------------------------------------------------------------

    def get(self, node_id: NodeId) -> NodeConnection | None:
        """The pooled live connection to ``node_id``, if any."""
        node = self._pool.get(node_id)
        if node is not None and node.connection.closed:
            del self._pool[node_id]
            return None
        return node

    def active(self) -> list[NodeConnection]:
        return [n for n in self._pool.values() if not n.connection.closed]

    async def connect(self, node_id: NodeId, address: Address) -> NodeConnection:
        """A verified connection to ``node_id`` (pooled, or dialled at
        ``address``). The caller's cancel scope bounds the attempt."""
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        while True:
            existing = self.get(node_id)
            if existing is not None:
                existing.last_used = trio.current_time()
                await trio.lowlevel.checkpoint()
                return existing
            pending = self._dialling.get(node_id)
            if pending is None:
                break
            await pending.wait()
            if self.get(node_id) is None:
                break  # that attempt failed: try ourselves
        done = self._dialling[node_id] = trio.Event()
        try:
            async with self._dial_limit:
                self.dials += 1
                started = trio.current_time()
                try:
                    conn = await self._dial(node_id, address)
                except NodeConnectionError:
                    self.dial_failures += 1
                    raise
                self._dial_times.note(trio.current_time() - started)
            if self._stopping or self._nursery is None:
                await conn.aclose(_CLOSE_STOPPING)
                raise trio.ClosedResourceError("the node is stopping")
            return self._adopt(conn, outgoing=True, started=started)
        finally:
            del self._dialling[node_id]
            done.set()

    # -- attempt deadlines ---------------------------------------------------------

    def attempt_timeout(self, ceiling: float = 15.0) -> float:
        """The deadline for one attempt (a dial, a query): a multiple of the
        smoothed dial time, at least :data:`MIN_ATTEMPT_TIMEOUT`, at most
        ``ceiling``; :data:`DEFAULT_ATTEMPT_TIMEOUT` before the first dial."""
        return self._dial_times.timeout(ceiling)

    # -- hole punching: the initiator ------------------------------------------------

    async def connect_punched(
        self, node_id: NodeId, signaller: NodeConnection
    ) -> NodeConnection:
        """A verified connection to ``node_id`` through a hole punch that
        ``signaller`` signals (step 1 and 4 of polykey.nodes.signalling).
        The caller's cancel scope bounds it; raises NodeConnectionError, or
        the signaller's refusal (an RPCError)."""
        existing = self.get(node_id)
        if existing is not None:
            await trio.lowlevel.checkpoint()
            return existing
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        # Once the signaller relays, the target opens its NAT to us, which
        # may be before its answer reaches us: a plain dial to it started
        # after we asked would slip through the same hole and race this one
        # (a second connection, and the wrong path on whichever wins). So
        # connect() waits for this attempt, as for any dial in flight, and
        # dials itself only if it fails. A dial already in flight is left to
        # run: its Initial went out before any hole could open.
        started = trio.current_time()
        done: trio.Event | None = None
        if node_id not in self._dialling:
            done = self._dialling[node_id] = trio.Event()
        try:
            address = await request_signal(signaller.rpc, self.identity, node_id)
            log.debug(
                "%s signalled %s: dialling it at %s",
                signaller.node_id,
                node_id,
                format_host_port(address.host, address.port),
            )
            self.punched_dials += 1
            async with self._dial_limit:
                try:
                    conn = await self._dial_punched(node_id, address)
                except NodeConnectionError:
                    self.punched_dial_failures += 1
                    raise
            existing = self.get(node_id)
            if existing is not None:
                # Its own connection arrived meanwhile (it dialled us, or
                # another race won): keep one.
                await conn.aclose(_CLOSE_DUPLICATE, b"duplicate")
                return existing
            if self._stopping or self._nursery is None:
                await conn.aclose(_CLOSE_STOPPING)
                raise trio.ClosedResourceError("the node is stopping")
            return self._adopt(
                conn, outgoing=True, path=ConnectionPath.PUNCHED, started=started
            )
        finally:
            if done is not None:
                del self._dialling[node_id]
                done.set()

    async def _dial_punched(
        self, node_id: NodeId, address: NodeAddress
    ) -> QUICConnection:
        """Dial ``address`` with spraying, and every source the target's
        punch packets arrive from (its peer-reflexive addresses); the first
        verified connection wins and cancels the rest."""
        winner: QUICConnection | None = None
        errors: list[BaseException] = []
        with self.socket.watch_strays(address.host) as strays:
            async with trio.open_nursery() as nursery:

                async def attempt(target: tuple[str, int]) -> None:
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
                        await conn.aclose(_CLOSE_DUPLICATE, b"duplicate")

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

    # -- hole punching: the target and the signaller --------------------------------------

    def live_connection(self, node_id: NodeId) -> NodeConnection | None:
        return self.get(node_id)

    def now(self) -> float:
        return trio.current_time()

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        if self._nursery is None or self._forwards >= MAX_FORWARDS:
            self.signals_dropped += 1
            return
        self._forwards += 1
        self._nursery.start_soon(self._forward, target, params)

    async def _forward(self, target: NodeId, params: JSONObject) -> None:
        try:
            with trio.move_on_after(self._rpc_timeout):
                node = self.get(target)
                if node is None:
                    self.signal_failures += 1
                    return
                try:
                    await node.rpc.unary(SIGNAL_FINAL, params)
                except Exception as exc:
                    # Fire and forget: the requester learns nothing of it.
                    self.signal_failures += 1
                    log.debug("signal to %s failed: %r", target, exc)
                    return
                self.signals_forwarded += 1
        finally:
            self._forwards -= 1

    def punch(self, request: SignalRequest) -> None:
        """Spray noise toward ``request.address`` until ``request.source``'s
        connection arrives, for at most :data:`PUNCH_DURATION`; a punch
        already running toward that address is not doubled."""
        key = request.address.as_tuple()
        host = key[0]
        if (
            self._nursery is None
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
        self._awaiting_punch[request.source] = trio.current_time() + PUNCH_DURATION
        self.punches += 1
        self._nursery.start_soon(self._punch, request, key)

    async def _punch(self, request: SignalRequest, key: tuple[str, int]) -> None:
        try:
            with trio.move_on_after(PUNCH_DURATION):
                for delay in spray_delays():
                    if self.get(request.source) is not None:
                        return  # its connection is here
                    try:
                        await self.socket.send(os.urandom(_PUNCH_BYTES), key)
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

    # -- relaying (see polykey.nodes.relay) ------------------------------------------------

    def _datagram(self, sender: NodeId, data: bytes) -> None:
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
        table = self.relay_table
        if table is None or len(circuit_id) < CIRCUIT_ID_LEN:
            return
        out = table.route(sender, circuit_id, len(payload), trio.current_time())
        if out is None:
            return
        if isinstance(out, Circuit):
            self._circuit_closed(out)
            return
        node, out_id = out
        pooled = self._pool.get(node)
        if pooled is None or not pooled.connection.send_datagram(out_id + payload):
            table.statistics.datagrams_dropped += 1

    def _circuit_closed(self, circuit: Circuit) -> None:
        # An empty datagram on a circuit tells its end that it is over.
        for node, circuit_id in (
            (circuit.source, circuit.source_id),
            (circuit.target, circuit.target_id),
        ):
            pooled = self._pool.get(node)
            if pooled is not None:
                pooled.connection.send_datagram(circuit_id)

    def _open_end(self, relay: NodeConnection, circuit_id: bytes) -> VirtualPath:
        outer = relay.connection
        path = self.socket.open_virtual_path(
            lambda packet: outer.send_datagram(circuit_id + packet)
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
        for node in list(self._pool.values()):
            if node.connection.remote_address == path.address:
                node.connection.close(0, b"circuit closed")

    def _connection_gone(self, node: NodeConnection) -> None:
        """``node``'s connection ended: the circuits through it end too."""
        end = self._end_of.get(node.connection.remote_address)
        if end is not None:
            self._close_end(end)  # an inner (relayed) connection
        for key in [k for k in self._ends if k[0] == node.node_id]:
            self._close_end(key)
        if self.relay_table is not None:
            for circuit in self.relay_table.drop_node(node.node_id):
                self._circuit_closed(circuit)
        self._reserved_with.discard(node.node_id)

    def behind_nat(self) -> bool:
        """Whether a peer has seen us at an address that is not ours."""
        return any(not _is_local(host) for host, _ in self.reflexive)

    def relay_reserve(self, node_id: NodeId, ip: str) -> float:
        table = self.relay_table
        if table is None or (self.relay_mode == "auto" and self.behind_nat()):
            raise ReservationRefusedError("this node does not relay")
        if self.get(node_id) is None:
            raise PermissionDeniedError("reservations are for connected nodes")
        now = trio.current_time()
        return table.reserve(node_id, ip, now) - now

    async def relay_connect(self, source: NodeId, target: NodeId) -> Circuit:
        table = self.relay_table
        if table is None:
            raise ReservationRefusedError("this node does not relay")
        to_target = self.get(target)
        if to_target is None:
            raise RelayConnectionFailedError("no connection to the target")
        circuit = table.open(source, target, trio.current_time())
        try:
            with trio.fail_after(self.attempt_timeout(self._rpc_timeout)):
                await to_target.rpc.unary(
                    RELAY_STOP,
                    {
                        "sourceNodeIdEncoded": str(source),
                        "circuit": b64url_encode(circuit.target_id),
                    },
                )
        except (Exception, trio.TooSlowError) as exc:
            table.close(circuit)
            raise RelayConnectionFailedError(f"the target refused: {exc}") from None
        return circuit

    def relay_stop(self, relay: NodeId, source: NodeId, circuit_id: bytes) -> None:
        conn = self.get(relay)
        if relay not in self._reserved_with or conn is None:
            raise PermissionDeniedError("no reservation of ours on that relay")
        if (relay, circuit_id) in self._ends:
            raise RelayMalformedError("that circuit is open already")
        path = self._open_end(conn, circuit_id)
        assert self._nursery is not None
        self._nursery.start_soon(self._expect_circuit, (relay, circuit_id), path)
        log.debug("circuit from %s through %s", source, relay)

    async def _expect_circuit(
        self, key: tuple[NodeId, bytes], path: VirtualPath
    ) -> None:
        # The target's end: if the inner connection never comes, let go.
        await trio.sleep(_CIRCUIT_WAIT)
        if not any(
            n.connection.remote_address == path.address for n in self._pool.values()
        ):
            self._close_end(key)

    async def reserve(self, relay: NodeConnection) -> float | None:
        """Ask ``relay`` for a reservation; seconds it lasts, or None when
        it does not relay for us."""
        try:
            result = await relay.rpc.unary(RELAY_RESERVE, {})
        except Exception as exc:
            log.debug("no reservation on %s: %r", relay.node_id, exc)
            return None
        self._reserved_with.add(relay.node_id)
        expires = result.get("expiresMs") if isinstance(result, dict) else None
        return expires / 1000 if isinstance(expires, int) and expires > 0 else 60.0

    async def connect_relayed(
        self, node_id: NodeId, relay: NodeConnection
    ) -> NodeConnection:
        """A verified connection to ``node_id`` through ``relay`` (end to
        end: the relay forwards its packets, sealed). The caller's scope
        bounds it; raises NodeConnectionError or the relay's RelayError."""
        if node_id == self.node_id:
            raise ValueError("a node does not connect to itself")
        self.relayed_dials += 1
        started = trio.current_time()
        result = await relay.rpc.unary(
            RELAY_CONNECT, {"targetNodeIdEncoded": str(node_id)}
        )
        circuit_id = decode_circuit_id(
            result.get("circuit") if isinstance(result, dict) else None
        )
        path = self._open_end(relay, circuit_id)
        try:
            conn = await self._relayed_client.connect(
                path.address, verifier=node_verifier(node_id)
            )
        except BaseException as exc:
            self.relayed_dial_failures += 1
            self._close_end((relay.node_id, circuit_id))
            if isinstance(exc, QUICConnectionError):
                raise NodeConnectionError(
                    exc.close_reason, f"{node_id}: {exc}"
                ) from exc
            raise
        if self._stopping or self._nursery is None:
            await conn.aclose(_CLOSE_STOPPING)
            raise trio.ClosedResourceError("the node is stopping")
        node = self._adopt(
            conn, outgoing=True, path=ConnectionPath.RELAYED, started=started
        )
        self._nursery.start_soon(self._upgrade, node, relay.node_id)
        return node

    async def _upgrade(self, relayed: NodeConnection, relay_id: NodeId) -> None:
        """Keep trying to punch through to a node we reach by relay; a
        punched connection then takes the relayed one's place."""
        delay = _UPGRADE_FIRST
        node_id = relayed.node_id
        while not relayed.connection.closed and self._pool.get(node_id) is relayed:
            await trio.sleep(delay)
            delay = min(delay * 2, _UPGRADE_MAX)
            relay = self.get(relay_id)
            if relay is None or relayed.connection.closed:
                return
            with trio.move_on_after(max(3.0, 4 * self.attempt_timeout())):
                started = trio.current_time()
                try:
                    address = await request_signal(relay.rpc, self.identity, node_id)
                    conn = await self._dial_punched(node_id, address)
                except Exception as exc:
                    log.debug("upgrade of %s: %r", node_id, exc)
                    continue
                self._adopt(
                    conn, outgoing=True, path=ConnectionPath.PUNCHED, started=started
                )
                return

    async def _close_later(self, node: NodeConnection) -> None:
        await trio.sleep(_REPLACED_GRACE)
        await node.connection.aclose(_CLOSE_DUPLICATE, b"replaced")

    # -- anchors: connections we keep -----------------------------------------------------

    def anchor(self, node_id: NodeId, addresses: list[Address]) -> None:
        """Keep a connection to ``node_id`` (a seed): never reaped, pinged
        every :data:`ANCHOR_PING_INTERVAL` (which renews the peer's TTL of
        it and tells us where we are seen), a relay reservation held on it
        where it offers one, and re-dialled with backoff when lost."""
        if node_id in self._anchored or self._nursery is None:
            return
        self._anchored.add(node_id)
        self._nursery.start_soon(self._anchor, node_id, addresses)

    async def _anchor(self, node_id: NodeId, addresses: list[Address]) -> None:
        backoff = 1.0
        while True:
            conn = self.get(node_id)
            if conn is None:
                for address in addresses:
                    with trio.move_on_after(self.attempt_timeout()):
                        try:
                            conn = await self.connect(node_id, address)
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
                lasts = await self.reserve(conn)
                if lasts is not None:
                    renew_at = trio.current_time() + lasts / 2
            while not conn.connection.closed and trio.current_time() < renew_at:
                with trio.move_on_after(ANCHOR_PING_INTERVAL):
                    await conn.connection.wait_closed()
                if not conn.connection.closed:
                    await self._ping_anchor(conn)

    async def _ping_anchor(self, conn: NodeConnection) -> None:
        with trio.move_on_after(self.attempt_timeout(self._rpc_timeout)):
            try:
                result = await conn.rpc.unary(PING, {})
            except Exception:
                return  # not ours (a Polykey seed has no nodesPing): fine
            seen = result.get("address") if isinstance(result, dict) else None
            if isinstance(seen, dict):
                try:
                    address = NodeAddress(seen.get("host"), seen.get("port"))
                except InvalidAddressError:
                    return
                self._note_reflexive(address.as_tuple())

    def _note_reflexive(self, address: tuple[str, int]) -> None:
        if address in self.reflexive:
            self.reflexive.remove(address)
        self.reflexive.insert(0, address)
        del self.reflexive[_MAX_REFLEXIVE:]

    # -- dialling, continued ------------------------------------------------------------

    async def _dial(self, node_id: NodeId, address: Address) -> QUICConnection:
        """Dial ``address`` (a hostname: each address it resolves to, in
        turn) with ``node_id`` pinned."""
        host, port = address
        targets = [address]
        if not _is_ip_literal(host):
            family = self.socket.host_family
            try:
                infos = await trio.socket.getaddrinfo(
                    host,
                    port,
                    family=0 if family == stdlib_socket.AF_INET6 else family,
                    type=stdlib_socket.SOCK_DGRAM,
                )
            except OSError as exc:
                raise NodeConnectionError(
                    CloseReason(CloseKind.LOCAL, reason=b"unresolvable"),
                    f"{node_id}: cannot resolve {host!r}: {exc}",
                ) from exc
            targets = list(dict.fromkeys((str(i[4][0]), port) for i in infos))
        error: NodeConnectionError | None = None
        for target in targets:
            try:
                return await self._client.connect(
                    target, verifier=node_verifier(node_id)
                )
            except QUICConnectionError as exc:
                error = NodeConnectionError(exc.close_reason, f"{node_id}: {exc}")
                error.__cause__ = exc
            except OSError as exc:
                error = NodeConnectionError(
                    CloseReason(CloseKind.LOCAL, reason=b"unreachable"),
                    f"{node_id} at {format_host_port(*target)}: {exc}",
                )
                error.__cause__ = exc
        assert error is not None
        raise error

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": len(self._pool),
            "dials": self.dials,
            "dial_failures": self.dial_failures,
            "punched_dials": self.punched_dials,
            "punched_dial_failures": self.punched_dial_failures,
            "punches": self.punches,
            "punches_refused": self.punches_refused,
            "signals_forwarded": self.signals_forwarded,
            "signals_dropped": self.signals_dropped,
            "signal_failures": self.signal_failures,
            "attempt_timeout": self.attempt_timeout(),
            "server": attrs.asdict(self._server.statistics),
            "socket": attrs.asdict(self.socket.statistics),
        }
