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
dials to one NodeId share one attempt, and at most ``max_dials`` run at once.
Every verified connection is reported to ``on_connection`` with the address
the peer was seen at, which is how the node graph learns of it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket as stdlib_socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

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
)
from ..rpc import RPCClient, RPCServer
from ._address import format_host_port

__all__ = [
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


def sticky_ttl(
    own_id: NodeId, node_id: NodeId, *, minimum: float = 60.0, scale: float = 7200.0
) -> float:
    """Polykey's idle TTL for a connection: 60 s for the farthest bucket,
    rising linearly to 60 s + 2 h for the closest (symmetric: both ends
    compute the same value)."""
    return minimum + (1 - bucket_index(own_id, node_id) / 255) * scale


class NodeConnectionError(QUICConnectionError):
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
        self.dials = 0
        self.dial_failures = 0

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

    def _adopt(self, conn: QUICConnection, *, outgoing: bool) -> NodeConnection:
        node_id = conn.peer_identity
        assert isinstance(node_id, NodeId)
        node = NodeConnection(
            node_id=node_id,
            connection=conn,
            rpc=RPCClient(None, conn.open_stream, timeout=self._rpc_timeout),
            last_used=trio.current_time(),
            outgoing=outgoing,
        )
        # Keep the first connection per node; a second (both dialled at
        # once) still serves RPC until its TTL.
        self._pool.setdefault(node_id, node)
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_connection, node)
        host, port = node.address
        log.info(
            "%s connection with %s at %s:%d",
            "outgoing" if outgoing else "incoming",
            node_id,
            host,
            port,
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
                try:
                    conn = await self._dial(node_id, address)
                except NodeConnectionError:
                    self.dial_failures += 1
                    raise
            if self._stopping or self._nursery is None:
                await conn.aclose(_CLOSE_STOPPING)
                raise trio.ClosedResourceError("the node is stopping")
            return self._adopt(conn, outgoing=True)
        finally:
            del self._dialling[node_id]
            done.set()

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
            "server": attrs.asdict(self._server.statistics),
            "socket": attrs.asdict(self.socket.statistics),
        }
