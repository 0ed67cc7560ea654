"""Exceptions of the QUIC layer.

:class:`QuicheError` carries a quiche error code (``QUICHE_ERR_*``, always
negative) as raised by the binding. Stream-level peer actions get their own
classes because they carry the peer's application error code. The trio layer
turns those into :class:`trio.BrokenResourceError` for stream users.
"""

from __future__ import annotations

from ..errors import PolykeyError

__all__ = [
    "QUICError",
    "QuicheError",
    "StreamReset",
    "StreamStopped",
    "TLSConfigError",
]

# quiche.h's enum quiche_error, by code.
_QUICHE_ERROR_NAMES = {
    -1: "DONE",
    -2: "BUFFER_TOO_SHORT",
    -3: "UNKNOWN_VERSION",
    -4: "INVALID_FRAME",
    -5: "INVALID_PACKET",
    -6: "INVALID_STATE",
    -7: "INVALID_STREAM_STATE",
    -8: "INVALID_TRANSPORT_PARAM",
    -9: "CRYPTO_FAIL",
    -10: "TLS_FAIL",
    -11: "FLOW_CONTROL",
    -12: "STREAM_LIMIT",
    -13: "FINAL_SIZE",
    -14: "CONGESTION_CONTROL",
    -15: "STREAM_STOPPED",
    -16: "STREAM_RESET",
    -17: "ID_LIMIT",
    -18: "OUT_OF_IDENTIFIERS",
    -19: "KEY_UPDATE",
    -20: "CRYPTO_BUFFER_EXCEEDED",
    -21: "INVALID_ACK_RANGE",
    -22: "OPTIMISTIC_ACK_DETECTED",
    -23: "INVALID_DCID_INITIALIZATION",
}


class QUICError(PolykeyError):
    """Base class of the QUIC layer's exceptions."""


class QuicheError(QUICError):
    """A quiche call failed; ``code`` is quiche's (negative) error code."""

    def __init__(self, code: int, context: str = "") -> None:
        self.code = code
        self.name = _QUICHE_ERROR_NAMES.get(code, "UNKNOWN")
        where = f"{context}: " if context else ""
        super().__init__(f"{where}quiche error {self.name} ({code})")


class StreamReset(QuicheError):
    """The peer reset the stream (RESET_STREAM) with ``error_code``."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(-16, f"stream {stream_id} reset by peer, code {error_code}")


class StreamStopped(QuicheError):
    """The peer asked us to stop sending (STOP_SENDING) with ``error_code``."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(-15, f"stream {stream_id} stopped by peer, code {error_code}")


class TLSConfigError(QUICError):
    """The certificate chain or private key could not be loaded."""
