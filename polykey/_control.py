"""The local control channel: ``python -m polykey agent|nodes ...`` talking
to a running node.

A node serves a few RPC methods (polykey/_control_methods.py; their JSON is
listed in docs/cli.md) on a Unix socket in its state directory
(``control.sock``, mode 0600, so only its owner can use it), with the same
RPC as between nodes (one connection per call). Nothing here is reachable
from the network.

Only the node's owner can connect, but a client that hangs (or a script
that opens sockets in a loop) must not cost the node its file descriptors:
each client has ``REQUEST_TIMEOUT`` to send its request, each call then runs
under its method's timeout, at most ``MAX_CLIENTS`` are served at once (one
more is closed as soon as it is accepted), and ``accept()`` failing for want
of descriptors or memory is waited out, as :func:`trio.serve_listeners`
does, instead of ending the node. The counters are in the ``control`` part
of the ``nodeStatus`` reply.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._control_methods import control_methods
from .rpc import RPCClient, RPCServer

if TYPE_CHECKING:
    from .agent import PolykeyNode

__all__ = [
    "CONTROL_SOCKET",
    "ControlServer",
    "ControlStatistics",
    "control_client",
    "serve_control",
]

CONTROL_SOCKET = "control.sock"

# Module attributes, not Final: tests lower them. Each is read when a
# ControlServer starts.
#: Seconds a control client has to send its whole request (the RPC server's
#: default timeout; ``nodeStatus`` answers within it too).
REQUEST_TIMEOUT = 10.0
#: Control clients served at once; one more is closed as soon as accepted
#: (a node passes its ``NodeLimits.control_clients``).
MAX_CLIENTS = 16
#: Seconds to wait after ``accept()`` failed for want of a resource.
ACCEPT_RETRY_DELAY = 0.1

# accept() errors that say "not now" (trio.serve_listeners waits these out).
_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)

log = logging.getLogger("polykey.control")

JSON = dict[str, Any]


@attrs.define
class ControlStatistics:
    """Counters of the control socket."""

    #: Clients being served now.
    clients: int = 0
    accepted: int = 0
    #: Clients closed at once because ``MAX_CLIENTS`` were being served.
    refused_busy: int = 0
    #: ``accept()`` failures for want of descriptors or memory (waited out).
    accept_errors: int = 0
    #: Calls that timed out (no request in time, or a method's timeout).
    timeouts: int = 0
    #: Bugs of ours in a control call (a method's, or the call's own
    #: running), caught, logged at WARNING and answered -32603 or closed;
    #: the socket serves on.
    bugs: int = 0


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


class ControlServer:
    """Serves the control methods on ``state_dir/control.sock``, within the
    limits above."""

    def __init__(
        self, node: PolykeyNode, state_dir: Path, *, max_clients: int | None = None
    ) -> None:
        self._node = node
        self._path = state_dir / CONTROL_SOCKET
        self._max_clients = MAX_CLIENTS if max_clients is None else max_clients
        self._retry_delay = ACCEPT_RETRY_DELAY
        self._rpc = RPCServer(control_methods(node, self), timeout=REQUEST_TIMEOUT)
        self._stats = ControlStatistics()

    def statistics(self) -> ControlStatistics:
        rpc = self._rpc.statistics()
        self._stats.timeouts = rpc.timeouts
        self._stats.bugs = rpc.internal_errors + rpc.handler_bugs
        return attrs.evolve(self._stats)

    async def serve(
        self, *, task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; the socket file is removed on the way out."""
        path = self._path
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
            async with self._rpc, listener, trio.open_nursery() as nursery:
                task_status.started(self)
                await self._accept_loop(listener, nursery)
        finally:
            path.unlink(missing_ok=True)

    async def _accept_loop(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> None:
        stats = self._stats
        failing = busy = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                # The client stays queued in the kernel; a descriptor freed
                # (a call ending) lets the next try take it.
                stats.accept_errors += 1
                if not failing:
                    log.warning(
                        "control socket: cannot accept a client (%s); "
                        "retrying every %g s",
                        os.strerror(exc.errno),
                        self._retry_delay,
                    )
                    failing = True
                await trio.sleep(self._retry_delay)
                continue
            failing = False
            stats.accepted += 1
            if stats.clients >= self._max_clients:
                stats.refused_busy += 1
                if not busy:
                    log.warning(
                        "control socket: %d clients already; closing new ones",
                        self._max_clients,
                    )
                    busy = True
                await trio.aclose_forcefully(stream)
                continue
            busy = False
            stats.clients += 1
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            # In this task: a call's end frees its slot. The RPC server
            # bounds it: REQUEST_TIMEOUT for the request, then the method's
            # timeout, then its linger for the client's FIN.
            await self._rpc.serve_stream(stream, {"peer": "control"})
        finally:
            self._stats.clients -= 1


async def serve_control(
    node: PolykeyNode,
    state_dir: Path,
    *,
    max_clients: int | None = None,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control methods on ``state_dir/control.sock`` until
    cancelled; the socket file is removed on the way out. ``max_clients``
    replaces ``MAX_CLIENTS`` (a node's ``NodeLimits.control_clients``)."""
    await ControlServer(node, state_dir, max_clients=max_clients).serve(
        task_status=task_status
    )


def control_client(state_dir: Path) -> RPCClient[Any]:
    """An RPC client for the node running with ``state_dir``."""
    path = str(state_dir / CONTROL_SOCKET)

    async def connect() -> trio.SocketStream:
        return await trio.open_unix_socket(path)

    return RPCClient(None, connect)
