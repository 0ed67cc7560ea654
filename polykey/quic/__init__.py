"""QUIC for trio, on Cloudflare quiche.

``QUICSocket`` owns a UDP socket shared by a ``QUICServer`` and any number of
client connections dialled with ``QUICClient``/``connect``. Connections carry
``QUICStream``s, which are trio half-closeable streams. See docs/quic.md.
"""

from __future__ import annotations

from ._address import Address, unmap_ipv4
from ._binding import quiche_version
from ._carrier import DatagramForward
from ._client import QUICClient, connect
from ._config import PeerVerifier, QUICConfig, TLSIdentity
from ._connection import ConnectionStatistics, QUICConnection
from ._errors import (
    CloseKind,
    CloseReason,
    PeerVerificationError,
    QUICConnectionError,
    QUICError,
    QuicheError,
    QuicheErrorCode,
    QUICStreamError,
    StreamReset,
    StreamStopped,
    TLSAlert,
    TLSConfigError,
    TransportErrorCode,
)
from ._server import CLOSE_HANDLER_FAILED, QUICServer, ServerStatistics
from ._socket import QUICSocket, SocketStatistics, StrayWatch, VirtualPath
from ._spray import spray_delays
from ._stream import QUICStream
from ._tls import node_tls_identity, node_verifier

__all__ = [
    "CLOSE_HANDLER_FAILED",
    "Address",
    "CloseKind",
    "CloseReason",
    "ConnectionStatistics",
    "DatagramForward",
    "PeerVerificationError",
    "PeerVerifier",
    "QUICClient",
    "QUICConfig",
    "QUICConnection",
    "QUICConnectionError",
    "QUICError",
    "QUICServer",
    "QUICSocket",
    "QUICStream",
    "QUICStreamError",
    "QuicheError",
    "QuicheErrorCode",
    "ServerStatistics",
    "SocketStatistics",
    "StrayWatch",
    "StreamReset",
    "StreamStopped",
    "TLSAlert",
    "TLSConfigError",
    "TLSIdentity",
    "TransportErrorCode",
    "VirtualPath",
    "connect",
    "node_tls_identity",
    "node_verifier",
    "quiche_version",
    "spray_delays",
    "unmap_ipv4",
]
