"""Dialling QUIC connections from a :class:`~polykey.quic.QUICSocket`.

quiche follows Retry and version negotiation by itself; all a client needs is
a route for its own connection id on the socket. :meth:`QUICClient.connect`
returns only once the handshake is done and the server's certificate chain
passed the verifier (pinned to an expected NodeId by the nodes layer). The
caller's cancel scope bounds the whole attempt; a cancelled attempt closes
its connection before the ``Cancelled`` propagates.
"""

from __future__ import annotations

import os

import trio

from . import _binding
from ._address import Address
from ._config import PeerVerifier, QUICConfig, TLSIdentity
from ._connection import QUICConnection
from ._socket import CID_LEN, QUICSocket
from ._spray import spray_delays

__all__ = ["QUICClient", "connect"]


class QUICClient:
    """Dials connections from ``socket`` with one identity and config.

    Building the TLS context takes a moment, so keep one client per identity
    and dial many connections from it.
    """

    def __init__(
        self,
        socket: QUICSocket,
        identity: TLSIdentity,
        *,
        config: QUICConfig | None = None,
        verifier: PeerVerifier | None = None,
    ) -> None:
        self._socket = socket
        self._config = config or QUICConfig()
        self._binding_config = self._config.binding_config(identity, server=False)
        self._verifier = verifier

    async def connect(
        self,
        address: Address,
        *,
        verifier: PeerVerifier | None = None,
        server_name: str | None = None,
        spray: bool = False,
    ) -> QUICConnection:
        """Connect to ``address`` (``(host, port)``); ``verifier`` overrides
        the client's for this connection (for example, to pin a NodeId).

        ``spray``: dialling through a hole punch, re-send the first Initial
        at short jittered intervals (see :mod:`polykey.quic._spray`) until
        the peer answers, instead of waiting for quiche's retransmission.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        socket = self._socket
        peer = socket.normalize_address(address)
        scid = os.urandom(CID_LEN)
        q = _binding.Connection.connect(
            self._binding_config, server_name, scid, socket.local_address, peer
        )
        conn = QUICConnection(
            socket,
            q,
            is_server=False,
            config=self._config,
            verifier=verifier or self._verifier,
            remote_address=peer,
        )
        socket.route(scid, conn)
        if spray:
            conn.keep_first_flight()
        conn.start(None)
        try:
            if spray:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_respray, conn)
                    verified = await conn.wait_handshake()
                    nursery.cancel_scope.cancel()
            else:
                verified = await conn.wait_handshake()
        except BaseException:
            conn.close(0, b"connect cancelled")
            raise
        if not verified:
            raise conn.closed_error()
        return conn


async def _respray(conn: QUICConnection) -> None:
    for delay in spray_delays():
        await trio.sleep(delay)
        if not conn.resend_first_flight():
            return


async def connect(
    socket: QUICSocket,
    address: Address,
    identity: TLSIdentity,
    *,
    config: QUICConfig | None = None,
    verifier: PeerVerifier | None = None,
    server_name: str | None = None,
) -> QUICConnection:
    """Dial one connection: a one-off :class:`QUICClient`."""
    client = QUICClient(socket, identity, config=config, verifier=verifier)
    return await client.connect(address, server_name=server_name)
