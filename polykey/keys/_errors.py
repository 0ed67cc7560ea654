"""Exceptions of the identity layer.

Messages say what was wrong and never include key material. Certificate
errors carry the TLS alert a QUIC endpoint should send when a peer's chain
fails with them (``tls_alert``), mirroring how Polykey maps its checks to
``CryptoError`` codes: expired (and not yet valid) certificates get
``certificate_expired``, an empty chain ``certificate_required``, everything
else ``bad_certificate``.
"""

from __future__ import annotations

from ..errors import PolykeyError

__all__ = [
    "CertificateChainEmptyError",
    "CertificateChainError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateIdentityError",
    "CertificateKeyTypeError",
    "CertificateNotYetValidError",
    "CertificateParseError",
    "CertificateSignatureError",
    "CertificateValidityError",
    "KeyFileError",
    "KeysError",
    "NodeIdError",
    "NodeIdMismatchError",
    "NodeSignatureError",
]

# TLS alert descriptions (RFC 8446 section 6); QUIC sends 0x100 + alert.
_BAD_CERTIFICATE = 42
_CERTIFICATE_EXPIRED = 45
_CERTIFICATE_REQUIRED = 116


class KeysError(PolykeyError):
    """Base class of the identity layer's exceptions."""


class NodeIdError(KeysError, ValueError):
    """A NodeId could not be built or parsed."""


class KeyFileError(KeysError):
    """A key file is missing, unreadable, corrupt or holds the wrong key."""


class CertificateError(KeysError):
    """A certificate or certificate chain failed verification."""

    tls_alert: int = _BAD_CERTIFICATE


class CertificateChainEmptyError(CertificateError):
    """The peer presented no certificate."""

    tls_alert = _CERTIFICATE_REQUIRED


class CertificateParseError(CertificateError):
    """The bytes are not a well-formed DER X.509 certificate."""


class CertificateKeyTypeError(CertificateError):
    """The certificate's key or signature algorithm is not Ed25519."""


class CertificateIdentityError(CertificateError):
    """The subject CN is missing, not a NodeId, or not the key's NodeId."""


class CertificateSignatureError(CertificateError):
    """The issuer's signature over the certificate does not verify."""


class CertificateChainError(CertificateError):
    """The chain is malformed: a link's issuer name does not match, or it is too long."""


class NodeSignatureError(CertificateError):
    """The Polykey node signature extension is missing, malformed or invalid."""


class CertificateValidityError(CertificateError):
    """The certificate is outside its validity period."""

    tls_alert = _CERTIFICATE_EXPIRED


class CertificateExpiredError(CertificateValidityError):
    """``now`` is after the certificate's notAfter."""


class CertificateNotYetValidError(CertificateValidityError):
    """``now`` is before the certificate's notBefore."""


class NodeIdMismatchError(CertificateError):
    """No certificate in the chain claims any of the expected NodeIds."""
