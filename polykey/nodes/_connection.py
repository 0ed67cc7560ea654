"""A verified connection to a node: what the pool holds and its parts share.

polykey.nodes exports these; they are defined here, not beside the
connection manager, so that the connection manager's parts
(:mod:`._punching`, :mod:`._relaying`, :mod:`._anchors`), which the
manager's module imports, can use them without an import cycle.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Final, TypeVar

import attrs
import trio

from ..keys import NodeId
from ..quic import (
    Address,
    CloseKind,
    CloseReason,
    QUICConnection,
    QUICConnectionError,
    QUICStream,
    unmap_ipv4,
)
from ..rpc import ClientManifest, RPCClient
from ._address import format_host_port
from ._errors import NodesError

__all__ = [
    "CLOSE_DIALBACK",
    "CLOSE_DUPLICATE",
    "CLOSE_STOPPING",
    "CLOSE_TTL",
    "ConnectionPath",
    "NodeConnection",
    "NodeConnectionError",
    "display_address",
]

CLOSE_TTL: Final = 0x1  # application code: closed after the TTL expired
CLOSE_STOPPING: Final = 0x2  # application code: the node is stopping
CLOSE_DUPLICATE: Final = 0x3  # application code: a second connection of a race
CLOSE_DIALBACK: Final = 0x4  # application code: a dial-back's probe, done


class ConnectionPath(enum.Enum):
    """How a connection came to be (in statistics, logs and the CLI)."""

    DIRECT = "direct"
    PUNCHED = "punched"
    RELAYED = "relayed"


class NodeConnectionError(QUICConnectionError, NodesError):
    """Dialling a node failed (unreachable, wrong identity, ...)."""

    @classmethod
    def unreachable(cls, node_id: NodeId) -> NodeConnectionError:
        return cls(
            CloseReason(CloseKind.LOCAL, reason=b"unreachable"),
            f"{node_id}: no address",
        )


def display_address(address: tuple[Any, ...]) -> Address:
    """``(host, port)`` with IPv4-mapped IPv6 written as plain IPv4."""
    return unmap_ipv4(str(address[0])), int(address[1])


M = TypeVar("M", bound=ClientManifest)


@attrs.define
class _Use:
    """When a connection was last used (trio time). Its stream factory
    holds this, never the NodeConnection: a cycle through the connection
    would keep a closed one's quiche state (native memory, which the cyclic
    collector does not count) until a full collection."""

    at: float


@attrs.define
class _Opener:
    """Opens the streams of one connection, marking it used: what its RPC
    clients hold (through a bound ``open_stream``, so that they can also
    open without waiting, see polykey.rpc.RPCClient), never the
    NodeConnection (see _Use)."""

    connection: QUICConnection
    use: _Use

    async def open_stream(self) -> QUICStream:
        self.use.at = trio.current_time()
        return await self.connection.open_stream()

    def open_stream_nowait(self) -> QUICStream:
        stream = self.connection.open_stream_nowait()
        self.use.at = trio.current_time()
        return stream


@attrs.define(eq=False)
class NodeConnection:
    """A verified connection to ``node_id`` and the RPC client over it.

    It is *in use* while a stream is open on it, either way, and
    ``last_used`` is when it last was (a stream opened or accepted, or
    seen open by the pool's reaper): its idle TTL counts from then, as
    Polykey's does from the end of its last use."""

    node_id: NodeId
    connection: QUICConnection
    _use: _Use = attrs.field(alias="last_used", converter=_Use)
    outgoing: bool = attrs.field(kw_only=True)
    path: ConnectionPath = attrs.field(default=ConnectionPath.DIRECT, kw_only=True)
    #: When it was verified (trio time).
    since: float = attrs.field(default=0.0, kw_only=True)
    #: When the attempt that made it began (trio time), for outgoing ones:
    #: the dial; for a punch, its signal request; for a relayed one, its
    #: circuit request. None for incoming connections.
    attempt_started: float | None = attrs.field(default=None, kw_only=True)
    #: The default RPC timeout of :attr:`rpc` and of :meth:`client`'s.
    rpc_timeout: float = attrs.field(default=math.inf, kw_only=True)
    #: One new stream per call, opened as :meth:`open_stream` does.
    rpc: RPCClient[Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rpc = self._client(None)

    @property
    def last_used(self) -> float:
        return self._use.at

    @last_used.setter
    def last_used(self, when: float) -> None:
        self._use.at = when

    @property
    def address(self) -> Address:
        return display_address(self.connection.remote_address)

    @property
    def peer(self) -> str:
        """Who the connection is to, for logs: NodeId and address."""
        return f"{self.node_id} at {format_host_port(*self.address)}"

    @property
    def in_use(self) -> bool:
        return self.connection.streams_open > 0

    async def open_stream(self) -> QUICStream:
        """A new stream on the connection, which counts as used."""
        return await _Opener(self.connection, self._use).open_stream()

    def client(self, manifest: type[M]) -> RPCClient[M]:
        """A typed RPC client over this connection: ``conn.client(MyAPI)``
        (see docs/rpc.md, "Clients"); one new stream per call, as ``rpc``."""
        return self._client(manifest)

    def _client(self, manifest: Any) -> RPCClient[Any]:
        # Bound to the connection and its use, not to self (see _Use).
        opener = _Opener(self.connection, self._use).open_stream
        return RPCClient(manifest, opener, timeout=self.rpc_timeout, peer=self.peer)
