"""Exceptions of the QUIC layer.

:class:`QuicheError` carries a quiche error code (``QUICHE_ERR_*``, always
negative) as raised by the binding. Stream-level peer actions get their own
classes because they carry the peer's application error code. The trio layer
turns those into :class:`trio.BrokenResourceError` for stream users.
"""

from __future__ import annotations

import enum

import attrs
import trio

from ..errors import PolykeyError

__all__ = [
    "CloseKind",
    "CloseReason",
    "PeerVerificationError",
    "QUICConnectionError",
    "QUICError",
    "QUICStreamError",
    "QuicheError",
    "QuicheErrorCode",
    "StreamReset",
    "StreamStopped",
    "TLSAlert",
    "TLSConfigError",
    "TransportErrorCode",
]


class QuicheErrorCode(enum.IntEnum):
    """quiche.h's ``enum quiche_error``: the one place its codes are named."""

    DONE = -1
    BUFFER_TOO_SHORT = -2
    UNKNOWN_VERSION = -3
    INVALID_FRAME = -4
    INVALID_PACKET = -5
    INVALID_STATE = -6
    INVALID_STREAM_STATE = -7
    INVALID_TRANSPORT_PARAM = -8
    CRYPTO_FAIL = -9
    TLS_FAIL = -10
    FLOW_CONTROL = -11
    STREAM_LIMIT = -12
    FINAL_SIZE = -13
    CONGESTION_CONTROL = -14
    STREAM_STOPPED = -15
    STREAM_RESET = -16
    ID_LIMIT = -17
    OUT_OF_IDENTIFIERS = -18
    KEY_UPDATE = -19
    CRYPTO_BUFFER_EXCEEDED = -20
    INVALID_ACK_RANGE = -21
    OPTIMISTIC_ACK_DETECTED = -22
    INVALID_DCID_INITIALIZATION = -23


class TransportErrorCode(enum.IntEnum):
    """The QUIC transport error codes (RFC 9000 section 20.1) polykey sends
    or reads: the one place they are named."""

    #: What a connection closed after a bug of ours is closed with.
    INTERNAL_ERROR = 0x1
    #: What quiche closes a peer with that opened more streams than allowed.
    STREAM_LIMIT_ERROR = 0x4
    #: Plus a TLS alert (:class:`TLSAlert`): a refused peer certificate.
    CRYPTO_ERROR = 0x100


class QUICError(PolykeyError):
    """Base class of the QUIC layer's exceptions."""


class QuicheError(QUICError):
    """A quiche call failed; ``code`` is quiche's (negative) error code."""

    def __init__(self, code: int, context: str = "") -> None:
        self.code = code
        try:
            self.name = QuicheErrorCode(code).name
        except ValueError:
            self.name = "UNKNOWN"
        where = f"{context}: " if context else ""
        super().__init__(f"{where}quiche error {self.name} ({code})")


class StreamReset(QuicheError):
    """The peer reset the stream (RESET_STREAM) with ``error_code``."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(
            QuicheErrorCode.STREAM_RESET,
            f"stream {stream_id} reset by peer, code {error_code}",
        )


class StreamStopped(QuicheError):
    """The peer asked us to stop sending (STOP_SENDING) with ``error_code``."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(
            QuicheErrorCode.STREAM_STOPPED,
            f"stream {stream_id} stopped by peer, code {error_code}",
        )


class TLSConfigError(QUICError):
    """The certificate chain or private key could not be loaded."""


class TLSAlert(enum.IntEnum):
    """TLS alerts a failed peer verification closes with (as 0x100 + alert,
    a QUIC CRYPTO_ERROR), as js-quic does."""

    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    CERTIFICATE_REQUIRED = 116


class PeerVerificationError(QUICError):
    """A peer verifier refuses the peer; ``alert`` is sent to it."""

    def __init__(
        self, message: str, alert: TLSAlert = TLSAlert.BAD_CERTIFICATE
    ) -> None:
        self.alert = alert
        super().__init__(message)


class CloseKind(enum.Enum):
    """Why a connection ended."""

    #: We closed it (``aclose``), with our code.
    LOCAL = "local"
    #: The peer sent CONNECTION_CLOSE with its code.
    PEER = "peer"
    #: Nothing was heard for the idle timeout.
    IDLE_TIMEOUT = "idle_timeout"
    #: We refused the peer's certificate chain (CRYPTO_ERROR 0x100 + alert).
    VERIFICATION = "verification"
    #: The handshake failed (TLS or transport error, either side).
    HANDSHAKE = "handshake"
    #: A server's handshake timeout expired.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: The socket under it closed.
    SOCKET_CLOSED = "socket_closed"
    #: quiche closed it for a protocol violation.
    PROTOCOL = "protocol"


@attrs.frozen
class CloseReason:
    """How a connection ended: ``code`` and ``reason`` are from the
    CONNECTION_CLOSE frame when there was one (``is_app`` tells an
    application code from a transport one)."""

    kind: CloseKind
    is_app: bool = False
    code: int = 0
    reason: bytes = b""

    def __str__(self) -> str:
        what = "application" if self.is_app else "transport"
        text = f"{self.kind.value}, {what} code {self.code:#x}"
        if self.reason:
            text += f" ({self.reason.decode(errors='replace')})"
        return text


class QUICConnectionError(QUICError, trio.BrokenResourceError):
    """The connection ended; ``close_reason`` says how."""

    def __init__(self, close_reason: CloseReason, message: str = "") -> None:
        self.close_reason = close_reason
        super().__init__(message or f"connection closed: {close_reason}")


class QUICStreamError(QUICError, trio.BrokenResourceError):
    """The peer reset the stream (RESET_STREAM, ``reset`` true) or asked us to
    stop sending (STOP_SENDING); ``code`` is the peer's application error code.
    ``reset_code`` and ``reset`` are what the RPC layer reads (its
    ``StreamAbort`` protocol)."""

    def __init__(self, stream_id: int, code: int, *, reset: bool) -> None:
        self.stream_id = stream_id
        self.code = code
        self.reset = reset
        what = "reset" if reset else "stopped"
        super().__init__(f"stream {stream_id} {what} by peer with code {code}")

    @property
    def reset_code(self) -> int:
        return self.code
