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
the peer was seen at and whether we dialled it, which is how the node graph
learns of it; the end of a node's last live connection, to
``on_disconnect``.

No task waits per connection (a node holds thousands of idle ones): each
stream the peer opens goes from the connection's callback to the RPC
server, which runs its call as a task, and the connection's end comes to
another callback, which takes it out of the pool. So ``on_disconnect`` is
called synchronously from wherever the connection ended, perhaps outside
any task (the socket's deferred flush runs in trio's scheduler): like
``on_connection`` it must not block, and work of its own goes to a
nursery.

Each connection records the path it took: ``direct``, ``punched`` when a
punch made it, or ``relayed`` through a relay's circuit. A relayed one
gives way to a direct or punched one when that arrives, after a grace for
the calls in flight on it.

Deadlines of single attempts follow what the network shows:
:meth:`attempt_timeout` follows the times dials and queries took recently
and their spread (within bounds, longer for a peer that just failed), so a
dead node costs a lookup a fraction of a second on a fast network instead
of Polykey's 15 s.

The manager's parts
-------------------
The manager owns the pool and dialling; three parts own the rest, each with
its theory of operation in its module:

- :class:`~polykey.nodes._punching.Puncher`: hole punching, both halves
  (the manager is the signalling handlers'
  :class:`~polykey.nodes._signalling.SignalHost`), and the upgrade of a
  relayed connection to a punched one;
- :class:`~polykey.nodes._relaying.Relaying`: relaying for others, and our
  ends of circuits (the manager is the relay handlers'
  :class:`~polykey.nodes._relay.RelayHost`);
- :class:`~polykey.nodes._anchors.Anchors`: the connections kept to seeds,
  and where peers see us.

The manager's public methods for what they do delegate to them. A part
holds the manager, and uses its public methods and the small API for parts
(:attr:`~NodeConnectionManager.running`, :meth:`~NodeConnectionManager.spawn`,
:meth:`~NodeConnectionManager.pooled`, :meth:`~NodeConnectionManager.pooled_at`,
:meth:`~NodeConnectionManager.adopt`,
:meth:`~NodeConnectionManager.adopt_dialled`,
:meth:`~NodeConnectionManager.dialling`,
:attr:`~NodeConnectionManager.dial_limit`,
:attr:`~NodeConnectionManager.rpc_timeout`), never another part: where one
needs another (an anchor's reservation is relaying's, a relayed
connection's upgrade the puncher's), it goes through the manager.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import socket as stdlib_socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, TypeVarTuple

import attrs
import trio

from ..keys import NodeId, NodeIdentity, bucket_index
from ..quic import (
    Address,
    CloseKind,
    CloseReason,
    QUICClient,
    QUICConfig,
    QUICConnection,
    QUICConnectionError,
    QUICServer,
    QUICSocket,
    QUICStream,
    node_tls_identity,
    node_verifier,
)
from ..rpc import JSONObject, RPCServer, StreamCode
from ._address import format_host_port
from ._anchors import Anchors
from ._attempts import AttemptTimer, DialGate
from ._connection import (
    CLOSE_DIALBACK,
    CLOSE_DUPLICATE,
    CLOSE_STOPPING,
    CLOSE_TTL,
    ConnectionPath,
    NodeConnection,
    NodeConnectionError,
)
from ._punching import Puncher
from ._relay import Circuit, RelayLimits, RelayTable
from ._relaying import Relaying
from ._signalling import SignalRequest

__all__ = [
    "ConnectionPath",
    "NodeConnection",
    "NodeConnectionError",
    "NodeConnectionManager",
    "sticky_ttl",
]

log = logging.getLogger("polykey.nodes.connections")

#: Called with (node_id, host, port, outgoing) for every verified connection,
#: at once and synchronously (a bug in it is logged, never the end of the
#: connection).
ConnectionCallback = Callable[[NodeId, str, int, bool], None]
#: Called with the NodeId when the last live connection to it has ended.
DisconnectCallback = Callable[[NodeId], None]

#: How long a replaced (relayed) connection lingers for calls in flight.
_REPLACED_GRACE: Final = 5.0

_Args = TypeVarTuple("_Args")


def sticky_ttl(
    own_id: NodeId, node_id: NodeId, *, minimum: float = 60.0, scale: float = 7200.0
) -> float:
    """Polykey's idle TTL for a connection: 60 s for the farthest bucket,
    rising linearly to 60 s + 2 h for the closest (symmetric: both ends
    compute the same value)."""
    return minimum + (1 - bucket_index(own_id, node_id) / 255) * scale


def _fields(node: NodeConnection) -> dict[str, object]:
    """A connection's fields for structured logs (``--log-format json``)."""
    host, port = node.address
    return {
        "peer": str(node.node_id),
        "address": format_host_port(host, port),
        "path": node.path.value,
        "direction": "outgoing" if node.outgoing else "incoming",
    }


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
        on_disconnect: DisconnectCallback | None = None,
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
        self._ttl = ttl
        self._ttl_for = ttl_for
        self._dial_limit = trio.CapacityLimiter(max_dials)
        self._rpc_timeout = rpc_timeout
        self._on_connection = on_connection
        self._on_disconnect = on_disconnect
        self._pool: dict[NodeId, NodeConnection] = {}
        self._gate = DialGate()
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._attempts = AttemptTimer()
        self.upgrades = 0
        #: Unexpected exceptions in a connection's task or a callback
        #: (logged at WARNING with the peer; the node goes on).
        self.task_errors = 0
        self.dials = 0
        self.dial_failures = 0
        # The parts (see the module doc): each owns what it does.
        self._puncher = Puncher(self, self._client)
        self._relaying = Relaying(self, tls, self._config, relay, relay_mode)
        self._anchors = Anchors(self)

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
            node.connection.close(CLOSE_STOPPING, b"node stopping")
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
            self.adopt(conn, outgoing=False)

    # -- the pool -------------------------------------------------------------

    def adopt(
        self,
        conn: QUICConnection,
        *,
        outgoing: bool,
        path: ConnectionPath = ConnectionPath.DIRECT,
        started: float | None = None,
    ) -> NodeConnection:
        """Pool and serve the verified connection ``conn`` (its path is
        ``relayed`` when it is on a circuit of ours, ``punched`` when a
        punch with the peer was under way, ours toward it or, since we asked
        for it, its toward us; else ``path``), and report it to
        ``on_connection``; ``started``: when the attempt that made it
        began. The manager must be :attr:`running`."""
        node_id = conn.peer_identity
        assert isinstance(node_id, NodeId)
        now = trio.current_time()
        if self._relaying.is_end(conn.remote_address):
            path = ConnectionPath.RELAYED
        elif self._puncher.arrived(node_id, now):
            path = ConnectionPath.PUNCHED  # it came through a punch
        node = NodeConnection(
            node_id=node_id,
            connection=conn,
            rpc_timeout=self._rpc_timeout,
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
        conn.on_datagram(functools.partial(self._relaying.datagram, node_id))
        # No task per connection (an idle one would keep it for its whole
        # life, docs/quic.md): its streams and its end come to callbacks.
        conn.call_when_finished(functools.partial(self._connection_ended, node))
        conn.deliver_streams_to(functools.partial(self._stream_opened, node))
        if conn.closed:  # it ended before the callbacks were in place
            self._connection_ended(node, conn)
        host, port = node.address
        log.info(
            "%s %s connection with %s at %s",
            "outgoing" if outgoing else "incoming",
            path.value,
            node_id,
            format_host_port(host, port),
            extra=_fields(node),
        )
        # A relayed connection's address is a virtual path's, meaningful on
        # this socket only: the graph must not learn it, nor peers hear it.
        if self._on_connection is not None and path is not ConnectionPath.RELAYED:
            try:
                self._on_connection(node_id, host, port, outgoing)
            except Exception:
                # A bug in the callback: the connection and the node go on.
                self._task_failed("connection callback", node_id, (host, port))
        return node

    def _stream_opened(self, node: NodeConnection, stream: QUICStream) -> None:
        """A stream the peer opened, from the connection's socket reader:
        its call runs as a task of the RPC server's."""
        node.last_used = trio.current_time()
        host, port = node.address
        meta: Mapping[str, Any] = {
            "node_id": node.node_id,
            "host": host,
            "port": port,
            "certificates": node.connection.peer_certificates,
        }
        if not self._rpc_server.handle_stream_nowait(stream, meta, connection=node):
            stream.reset(StreamCode.UNKNOWN)  # stopping: as handle_stream does

    def _connection_ended(self, node: NodeConnection, conn: QUICConnection) -> None:
        """``node``'s connection ended (from wherever it ended, outside any
        task of ours): it leaves the pool, and the circuits through it end."""
        try:
            if self._pool.get(node.node_id) is node:
                del self._pool[node.node_id]
                if self._on_disconnect is not None:
                    try:
                        self._on_disconnect(node.node_id)
                    except Exception:
                        self._task_failed(
                            "disconnect callback", node.node_id, node.address
                        )
            self._relaying.connection_gone(node)
        except Exception:
            # A bug: the node goes on.
            self._task_failed("connection end", node.node_id, node.address)
        log.info(
            "connection with %s ended: %s",
            node.node_id,
            conn.close_reason,
            extra={**_fields(node), "reason": str(conn.close_reason)},
        )

    def _task_failed(self, what: str, node_id: NodeId, address: Address) -> None:
        self.task_errors += 1
        log.warning(
            "%s for %s at %s failed unexpectedly",
            what,
            node_id,
            format_host_port(*address),
            exc_info=True,
        )

    async def _close_later(self, node: NodeConnection) -> None:
        await trio.sleep(_REPLACED_GRACE)
        await node.connection.aclose(CLOSE_DUPLICATE, b"replaced")

    def ttl_of(self, node_id: NodeId) -> float | None:
        """The idle TTL of the connection to ``node_id`` (None: kept)."""
        if self._anchors.holds(node_id):
            return None
        return self._ttl_for(node_id) if self._ttl_for else self._ttl

    async def _reaper(self) -> None:
        """Close connections idle for longer than their TTL."""
        while True:
            await trio.sleep(max(1.0, self._ttl / 4))
            now = trio.current_time()
            for node_id, node in list(self._pool.items()):
                if self._pool.get(node_id) is not node:
                    continue  # it ended, or gave way, as we closed another
                if node.in_use:
                    # Never while a call is on it; idle counts from now on.
                    node.last_used = now
                    continue
                ttl = self.ttl_of(node_id)
                if ttl is not None and now - node.last_used > ttl:
                    del self._pool[node_id]
                    await node.connection.aclose(CLOSE_TTL, b"idle")

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
        existing = await self._gate.turn(node_id, lambda: self.get(node_id))
        if existing is not None:
            existing.last_used = trio.current_time()
            return existing
        with self._gate.attempt(node_id):
            async with self._dial_limit:
                self.dials += 1
                started = trio.current_time()
                try:
                    conn = await self._dial(node_id, address)
                except NodeConnectionError:
                    self.dial_failures += 1
                    raise
                self._attempts.note(trio.current_time() - started)
            return await self.adopt_dialled(conn, started=started)

    async def dial_back(self, node_id: NodeId, address: Address) -> bool:
        """Dial ``node_id`` afresh at ``address`` whatever the pool holds,
        verify it is that node, and close the connection: whether a new
        connection to it can be had there (the node manager's check of a
        node that connected to us). False, untried, when an attempt to
        reach it is in flight already; a failure raises
        :class:`NodeConnectionError`. Holds the dial limit like any dial,
        but is not pooled nor reported to ``on_connection``, and is counted
        apart from :attr:`dials`. The caller's cancel scope bounds it."""
        if self._stopping:
            raise trio.ClosedResourceError("the node is stopping")
        if node_id in self._gate:
            return False
        with self._gate.attempt(node_id):
            async with self._dial_limit:
                conn = await self._dial(node_id, address)
        # Closed at once (no checkpoint before: a cancel cannot leak it).
        conn.close(CLOSE_DIALBACK, b"dial-back")
        return True

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

    # -- attempt deadlines ---------------------------------------------------------

    @property
    def attempts(self) -> AttemptTimer:
        """The attempt timer our dials feed; the node manager feeds it the
        times of its queries and pings, and backs it off per peer."""
        return self._attempts

    def attempt_timeout(self, ceiling: float = 15.0) -> float:
        """The deadline for one attempt (a dial, a query): from the smoothed
        time and deviation of the dials and attempts seen, at least
        :data:`MIN_ATTEMPT_TIMEOUT` (:data:`DEFAULT_ATTEMPT_TIMEOUT` before
        any), at most ``ceiling`` (see :mod:`~polykey.nodes._attempts`)."""
        return self._attempts.timeout(ceiling)

    # -- for the parts (puncher, relaying, anchors) ----------------------------------

    @property
    def running(self) -> bool:
        """Whether :meth:`run` has started, so that tasks may be spawned."""
        return self._nursery is not None

    def spawn(self, fn: Callable[[*_Args], Awaitable[object]], *args: *_Args) -> None:
        """Run ``fn(*args)`` as one of the manager's tasks (cancelled when it
        stops). The manager must be :attr:`running`. An unexpected
        exception in it is logged at WARNING and counted (``task_errors``),
        never the end of the manager."""
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, fn, *args)

    async def _guarded(
        self, fn: Callable[[*_Args], Awaitable[object]], *args: *_Args
    ) -> None:
        try:
            await fn(*args)
        except Exception:
            self.task_errors += 1
            log.warning(
                "task %s(%s) failed unexpectedly",
                getattr(fn, "__qualname__", fn),
                ", ".join(str(arg) for arg in args)[:300],
                exc_info=True,
            )

    def pooled(self, node_id: NodeId) -> NodeConnection | None:
        """The pool's connection to ``node_id``, closed or not (unlike
        :meth:`get`, the pool is left as it is)."""
        return self._pool.get(node_id)

    def pooled_at(self, address: tuple[Any, ...]) -> list[NodeConnection]:
        """The pool's connections whose peer is at ``address``, closed or
        not."""
        return [
            n for n in self._pool.values() if n.connection.remote_address == address
        ]

    async def adopt_dialled(
        self,
        conn: QUICConnection,
        *,
        path: ConnectionPath = ConnectionPath.DIRECT,
        started: float,
    ) -> NodeConnection:
        """:meth:`adopt` the outgoing connection ``conn``, just dialled;
        but when the manager stops (or never ran), close it and raise
        ``trio.ClosedResourceError``."""
        if self._stopping or self._nursery is None:
            await conn.aclose(CLOSE_STOPPING)
            raise trio.ClosedResourceError("the node is stopping")
        return self.adopt(conn, outgoing=True, path=path, started=started)

    @contextlib.contextmanager
    def dialling(self, node_id: NodeId) -> Iterator[None]:
        """Within the block, an attempt to reach ``node_id`` is in flight:
        :meth:`connect` waits for the block's end, and dials only if no
        connection came of it. Nothing is marked where a dial is in flight
        already."""
        with self._gate.attempt(node_id):
            yield

    @property
    def dials_in_flight(self) -> int:
        """Attempts to reach a node under way (one per node at most)."""
        return len(self._gate)

    @property
    def dial_limit(self) -> trio.CapacityLimiter:
        """Held by every dial (at most ``max_dials`` at once)."""
        return self._dial_limit

    @property
    def rpc_timeout(self) -> float:
        """The deadline of an RPC call over a connection of the pool."""
        return self._rpc_timeout

    # -- hole punching (see polykey.nodes._punching) ------------------------------------

    async def connect_punched(
        self, node_id: NodeId, signaller: NodeConnection
    ) -> NodeConnection:
        """A verified connection to ``node_id`` through a hole punch that
        ``signaller`` signals (step 1 and 4 of polykey.nodes._signalling).
        The caller's cancel scope bounds it; raises NodeConnectionError, or
        the signaller's refusal (an RPCError)."""
        return await self._puncher.connect(node_id, signaller)

    def live_connection(self, node_id: NodeId) -> NodeConnection | None:
        return self.get(node_id)

    def now(self) -> float:
        return trio.current_time()

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        """Forward a signal to ``target``, fire and forget; dropped past
        :data:`MAX_FORWARDS` at once."""
        self._puncher.forward_signal(target, params)

    def punch(self, request: SignalRequest) -> None:
        """Spray noise toward ``request.address`` until ``request.source``'s
        connection arrives, for at most :data:`PUNCH_DURATION`; a punch
        already running toward that address is not doubled."""
        self._puncher.punch(request)

    # -- relaying (see polykey.nodes._relaying) ------------------------------------------

    @property
    def relay_table(self) -> RelayTable | None:
        """The table of what we relay for others (None: we relay for nobody)."""
        return self._relaying.table

    @property
    def relay_mode(self) -> str:
        return self._relaying.mode

    def relay_reserve(self, node_id: NodeId, ip: str) -> float:
        return self._relaying.relay_reserve(node_id, ip)

    async def relay_connect(self, source: NodeId, target: NodeId) -> Circuit:
        return await self._relaying.relay_connect(source, target)

    def relay_stop(self, relay: NodeId, source: NodeId, circuit_id: bytes) -> None:
        self._relaying.relay_stop(relay, source, circuit_id)

    async def reserve(self, relay: NodeConnection) -> float | None:
        """Ask ``relay`` for a reservation; seconds it lasts, or None when
        it does not relay for us."""
        return await self._relaying.reserve(relay)

    async def connect_relayed(
        self, node_id: NodeId, relay: NodeConnection
    ) -> NodeConnection:
        """A verified connection to ``node_id`` through ``relay`` (end to
        end: the relay forwards its packets, sealed). The caller's scope
        bounds it; raises NodeConnectionError or the relay's RelayError.
        Punches through the relay keep trying to replace it."""
        node = await self._relaying.connect(node_id, relay)
        self.spawn(self._puncher.upgrade, node, relay.node_id)
        return node

    # -- anchors (see polykey.nodes._anchors) --------------------------------------------

    def anchor(self, node_id: NodeId, addresses: list[Address]) -> None:
        """Keep a connection to ``node_id`` (a seed): never reaped, pinged
        every :data:`ANCHOR_PING_INTERVAL` (which renews the peer's TTL of
        it and tells us where we are seen), a relay reservation held on it
        where it offers one, and re-dialled with backoff when lost."""
        self._anchors.anchor(node_id, addresses)

    @property
    def reflexive(self) -> list[Address]:
        """Where peers see us, most recent first."""
        return self._anchors.reflexive

    def behind_nat(self) -> bool:
        """Whether a peer has seen us at an address that is not ours."""
        return self._anchors.behind_nat()

    # -- counters ---------------------------------------------------------------------

    @property
    def punches(self) -> int:
        return self._puncher.punches

    @property
    def punches_refused(self) -> int:
        return self._puncher.punches_refused

    @property
    def punched_dials(self) -> int:
        return self._puncher.punched_dials

    @property
    def punched_dial_failures(self) -> int:
        return self._puncher.punched_dial_failures

    @property
    def signals_forwarded(self) -> int:
        return self._puncher.signals_forwarded

    @property
    def signals_dropped(self) -> int:
        return self._puncher.signals_dropped

    @property
    def signal_failures(self) -> int:
        return self._puncher.signal_failures

    @property
    def relayed_dials(self) -> int:
        return self._relaying.relayed_dials

    @property
    def relayed_dial_failures(self) -> int:
        return self._relaying.relayed_dial_failures

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
            "task_errors": self.task_errors,
            "attempt_timeout": self.attempt_timeout(),
            "server": attrs.asdict(self._server.statistics),
            "socket": attrs.asdict(self.socket.statistics),
        }
