"""The local control channel: ``python -m polykey status|find`` talking to a
running node.

A node serves a few RPC methods on a Unix socket in its state directory
(``control.sock``, mode 0600, so only its owner can use it), with the same
RPC as between nodes (one connection per call). Nothing here is reachable
from the network.

* ``nodeStatus`` (unary): the node's NodeId, address, connections and graph
  size.
* ``nodesFind`` (unary): ``{"nodeIdEncoded"}`` -> the node's addresses, found
  by an iterative lookup.
* ``nodesPingNode`` (unary): ``{"nodeIdEncoded"}`` -> connect to that node by
  NodeId alone (pooled, dialled or hole-punched), call its ``nodesPing``:
  ``{"nodeIdEncoded", "success", "path", "host", "port", "rttMs"}``
  (``success`` false with ``error`` when it cannot be reached).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .keys import NodeId, NodeIdError
from .nodes import NodeNotFoundError, NodesError, OwnNodeIdError, request_ping
from .rpc import (
    CallContext,
    RPCClient,
    RPCError,
    RPCInvalidParams,
    RPCServer,
    UnaryHandler,
)

if TYPE_CHECKING:
    from .agent import PolykeyNode

__all__ = ["CONTROL_SOCKET", "control_client", "serve_control"]

CONTROL_SOCKET = "control.sock"

JSON = dict[str, Any]


class _Status(UnaryHandler[JSON, JSON]):
    def __init__(self, node: PolykeyNode) -> None:
        self.node = node

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        node = self.node
        host, port = node.address
        return {
            "nodeIdEncoded": str(node.node_id),
            "host": host,
            "port": port,
            "connections": [
                {
                    "nodeIdEncoded": str(c.node_id),
                    "host": c.address[0],
                    "port": c.address[1],
                    "path": c.path.value,
                    "outgoing": c.outgoing,
                }
                for c in node.connections.active()
            ],
            "graphSize": len(node.graph),
            # Where peers see us (most recent first), and what it implies.
            "reflexive": [
                {"host": host, "port": port}
                for host, port in node.connections.reflexive
            ],
            "behindNat": node.connections.behind_nat(),
            "relay": node.relay_status(),
        }


class _Find(UnaryHandler[JSON, JSON]):
    def __init__(self, node: PolykeyNode) -> None:
        self.node = node

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        try:
            target = NodeId.from_string(str(params.get("nodeIdEncoded")))
        except NodeIdError as exc:
            raise RPCInvalidParams(str(exc)) from None
        try:
            contact = await self.node.find_node(target)
        except OwnNodeIdError:
            host, port = self.node.address
            return {"nodeIdEncoded": str(target), "addresses": [[host, port]]}
        except NodeNotFoundError:
            return {"nodeIdEncoded": str(target), "addresses": []}
        return {
            "nodeIdEncoded": str(target),
            "addresses": [[a.host, a.port] for a in contact.addresses],
        }


class _PingNode(UnaryHandler[JSON, JSON]):
    def __init__(self, node: PolykeyNode) -> None:
        self.node = node

    #: Long enough for a find and a punch; the caller's own timeout, if
    #: shorter, wins (js-rpc's timeout rule).
    timeout = 60.0

    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        try:
            target = NodeId.from_string(str(params.get("nodeIdEncoded")))
        except NodeIdError as exc:
            raise RPCInvalidParams(str(exc)) from None
        if target == self.node.node_id:
            raise RPCInvalidParams("that is this node's own NodeId")
        started = trio.current_time()
        try:
            conn = await self.node.connect(target)
            await request_ping(conn.rpc)
        except (NodesError, RPCError, OSError) as exc:
            return {
                "nodeIdEncoded": str(target),
                "success": False,
                "error": str(exc) or type(exc).__name__,
            }
        host, port = conn.address
        return {
            "nodeIdEncoded": str(target),
            "success": True,
            "path": conn.path.value,
            "host": host,
            "port": port,
            "rttMs": round((trio.current_time() - started) * 1000, 3),
        }


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a node that died; refuse if one is live."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise
    else:
        raise OSError(errno.EADDRINUSE, f"a node is already running with {path.parent}")
    finally:
        probe.close()


async def serve_control(
    node: PolykeyNode,
    state_dir: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control methods on ``state_dir/control.sock`` until
    cancelled; the socket file is removed on the way out."""
    path = state_dir / CONTROL_SOCKET
    _remove_stale(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with RPCServer(
            {
                "nodeStatus": _Status(node),
                "nodesFind": _Find(node),
                "nodesPingNode": _PingNode(node),
            }
        ) as rpc:
            task_status.started()
            async with listener:
                while True:
                    stream = await listener.accept()
                    await rpc.handle_stream(stream, {"peer": "control"})
    finally:
        path.unlink(missing_ok=True)


def control_client(state_dir: Path) -> RPCClient[Any]:
    """An RPC client for the node running with ``state_dir``."""
    path = str(state_dir / CONTROL_SOCKET)

    async def connect() -> trio.SocketStream:
        return await trio.open_unix_socket(path)

    return RPCClient(None, connect)
