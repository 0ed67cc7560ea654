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
import ipaddress
import logging
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
    node_tls_identity,
    node_verifier,
    spray_delays,
)
from ..rpc import JSONObject, RPCClient, RPCServer
from ._address import NodeAddress, format_host_port
from .errors import NodesError
from .signalling import SIGNAL_FINAL, SignalRequest, request_signal

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
#: Bounds of one attempt's deadline, and its multiple of the dial times seen.
MIN_ATTEMPT_TIMEOUT: Final = 0.5
DEFAULT_ATTEMPT_TIMEOUT: Final = 3.0
_ATTEMPT_RTTS: Final = 8


class ConnectionPath(enum.Enum):
    """How a connection came to be (in statistics, logs and the CLI)."""

    DIRECT = "direct"
    PUNCHED = "punched"


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
    ) -> None:
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
        # Smoothed dial time (seconds), None before the first dial.
        self._dial_time: float | None = None
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
            node.connection._close_now(
                is_app=True, code=_CLOSE_STOPPING, reason=b"node stopping"
            )
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
    ) -> NodeConnection:
        node_id = conn.peer_identity
        assert isinstance(node_id, NodeId)
        now = trio.current_time()
        if self._awaiting_punch.pop(node_id, 0.0) > now:
            path = ConnectionPath.PUNCHED  # it came through our punch
        node = NodeConnection(
            node_id=node_id,
            connection=conn,
            rpc=RPCClient(None, conn.open_stream, timeout=self._rpc_timeout),
            last_used=now,
            outgoing=outgoing,
            path=path,
            since=now,
        )
        # Keep the first connection per node; a second (both dialled at
        # once) still serves RPC until its TTL.
        self._pool.setdefault(node_id, node)
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_connection, node)
        host, port = node.address
        log.info(
            "%s %s connection with %s at %s",
            "outgoing" if outgoing else "incoming",
            path.value,
            node_id,
            format_host_port(host, port),
        )
        if self._on_connection is not None:
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
            if not conn.closed:
                await conn.aclose()
            log.info("connection with %s ended: %s", node.node_id, conn.close_reason)

    async def _reaper(self) -> None:
        """Close connections idle for longer than their TTL."""
        while True:
            await trio.sleep(max(1.0, self._ttl / 4))
            now = trio.current_time()
            for node_id, node in list(self._pool.items()):
                ttl = self._ttl_for(node_id) if self._ttl_for else self._ttl
                if now - node.last_used > ttl:
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
                self._note_dial_time(trio.current_time() - started)
            if self._stopping or self._nursery is None:
                await conn.aclose(_CLOSE_STOPPING)
                raise trio.ClosedResourceError("the node is stopping")
            return self._adopt(conn, outgoing=True)
        finally:
            del self._dialling[node_id]
            done.set()

    # -- attempt deadlines ---------------------------------------------------------

    def _note_dial_time(self, seconds: float) -> None:
        if self._dial_time is None:
            self._dial_time = seconds
        else:
            self._dial_time += (seconds - self._dial_time) / 8

    def attempt_timeout(self, ceiling: float = 15.0) -> float:
        """The deadline for one attempt (a dial, a query): a multiple of the
        smoothed dial time, at least :data:`MIN_ATTEMPT_TIMEOUT`, at most
        ``ceiling``; :data:`DEFAULT_ATTEMPT_TIMEOUT` before the first dial."""
        if self._dial_time is None:
            return min(ceiling, DEFAULT_ATTEMPT_TIMEOUT)
        return min(ceiling, max(MIN_ATTEMPT_TIMEOUT, _ATTEMPT_RTTS * self._dial_time))

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
            return self._adopt(conn, outgoing=True, path=ConnectionPath.PUNCHED)
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
