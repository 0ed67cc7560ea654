"""Verification of Polykey node certificates and chains.

Verification follows Polykey's ``verifyServerCertificateChain`` (a client
that dials known NodeIds) and ``verifyClientCertificateChain`` (a server,
which checks the whole chain), and is stricter in one way: a certificate's
CN must be the NodeId of its own key (Polykey reads the CN and the key
separately and never compares them). The format itself is described in
``_x509``.

Per certificate, in order: DER, Ed25519 key and signature algorithm, CN is
the key's NodeId, validity at ``now``, node signature. Per link (certificate
i issued by certificate i+1): issuer name, issuer signature. Each failure
raises its own :class:`~polykey.keys.CertificateError` subclass.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterable, Sequence
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from . import _der
from ._errors import (
    CertificateChainEmptyError,
    CertificateChainError,
    CertificateExpiredError,
    CertificateIdentityError,
    CertificateKeyTypeError,
    CertificateNotYetValidError,
    CertificateParseError,
    CertificateSignatureError,
    NodeIdError,
    NodeIdMismatchError,
    NodeSignatureError,
)
from ._node_id import NodeId

__all__ = [
    "MAX_CHAIN_LENGTH",
    "NODE_SIGNATURE_OID",
    "POLYKEY_VERSION_OID",
    "load_certificate",
    "verify_certificate",
    "verify_chain",
]

POLYKEY_VERSION_OID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.1")
NODE_SIGNATURE_OID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.2")
# A chain only grows by key renewals (expired ancestors are pruned), so a
# long one is an attack on the verifier, not a real node.
MAX_CHAIN_LENGTH: Final = 32
_ED25519_SIGNATURE_LENGTH: Final = 64
_UTC: Final = datetime.UTC


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(_UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(_UTC)


def _utc_seconds(now: datetime.datetime | None) -> datetime.datetime:
    # Validity has second resolution and notAfter is inclusive, so a
    # certificate is valid through its last second (Polykey's certNotExpiredBy
    # truncates the same way).
    return _utc(now).replace(microsecond=0)


# ------------------------------------------------------------------ parsing


def _check_outer_der(data: bytes) -> None:
    """What ``cryptography`` lets through in the certificate's unsigned
    outer layer, refused: one SEQUENCE filling the input, of exactly
    tbsCertificate, signatureAlgorithm and a signature BIT STRING with no
    unused bits. (It read a signature with its unused-bits byte flipped to
    1 as the same signature, so two encodings of one certificate were
    accepted: a single-byte change that verified.)"""
    try:
        outer = _der.read_tlv(data)
        if outer.tag != 0x30 or outer.end != len(data):
            raise _der.DERError("not one DER SEQUENCE")
        parts = _der.read_children(data, outer)
        if len(parts) != 3 or parts[2].tag != 0x03:
            raise _der.DERError("not tbsCertificate, algorithm, signature")
        signature = parts[2].content(data)
        if not signature or signature[0] != 0:
            raise _der.DERError("the signature BIT STRING has unused bits")
    except _der.DERError as exc:
        raise CertificateParseError(f"malformed certificate: {exc}") from None


def load_certificate(data: bytes | x509.Certificate) -> x509.Certificate:
    """Parse one DER certificate strictly; raises CertificateParseError.

    ``cryptography`` parses names and extensions lazily; we touch them here
    so that malformed contents fail as parse errors, not later.
    """
    if isinstance(data, x509.Certificate):
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"certificate must be DER bytes, not {type(data).__name__}")
    _check_outer_der(bytes(data))
    try:
        with warnings.catch_warnings():
            # A non-positive serial only warns today and will be an error in
            # a later cryptography; make it one now so behaviour is stable.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(bytes(data))
        cert.subject  # noqa: B018
        cert.issuer  # noqa: B018
        cert.extensions  # noqa: B018
        cert.not_valid_before_utc  # noqa: B018
        cert.not_valid_after_utc  # noqa: B018
    except (
        ValueError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        CryptographyDeprecationWarning,
    ) as exc:
        raise CertificateParseError(f"malformed certificate: {exc}") from None
    return cert


# ------------------------------------------------------------- verification


def _ed25519_key(cert: x509.Certificate) -> Ed25519PublicKey:
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise CertificateKeyTypeError(
            "certificate key algorithm is not supported"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateKeyTypeError(
            f"certificate key is {type(key).__name__.lstrip('_')}, not Ed25519"
        )
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
        raise CertificateKeyTypeError(
            f"certificate signature algorithm is {cert.signature_algorithm_oid.dotted_string},"
            " not Ed25519"
        )
    return key


def _node_id(cert: x509.Certificate, key: Ed25519PublicKey) -> NodeId:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertificateIdentityError(
            f"certificate subject has {len(names)} CNs, expected 1"
        )
    cn = names[0].value
    if not isinstance(cn, str):
        raise CertificateIdentityError("certificate CN is not a string")
    try:
        claimed = NodeId.from_string(cn)
    except NodeIdError as exc:
        raise CertificateIdentityError(
            f"certificate CN is not a NodeId: {exc}"
        ) from None
    actual = NodeId.from_public_key(key)
    if claimed != actual:
        raise CertificateIdentityError(
            f"certificate CN {claimed} is not the NodeId of its key ({actual})"
        )
    return actual


def _check_validity(
    cert: x509.Certificate, now: datetime.datetime, node_id: NodeId
) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"certificate of {node_id} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"certificate of {node_id} expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _check_node_signature(
    cert: x509.Certificate, key: Ed25519PublicKey, node_id: NodeId
) -> None:
    try:
        extension = cert.extensions.get_extension_for_oid(NODE_SIGNATURE_OID)
    except x509.ExtensionNotFound:
        raise NodeSignatureError(
            f"certificate of {node_id} has no node signature"
        ) from None
    value = extension.value
    assert isinstance(value, x509.UnrecognizedExtension)
    try:
        tlv = _der.read_tlv(value.value)
    except _der.DERError:
        tlv = None
    if tlv is None or tlv.tag != _der.TAG_OCTET_STRING or tlv.end != len(value.value):
        raise NodeSignatureError(f"node signature of {node_id} is not an OCTET STRING")
    signature = tlv.content(value.value)
    if len(signature) != _ED25519_SIGNATURE_LENGTH:
        raise NodeSignatureError(
            f"node signature of {node_id} is {len(signature)} bytes, expected 64"
        )
    try:
        tbs = _der.remove_extension(
            cert.tbs_certificate_bytes, NODE_SIGNATURE_OID.dotted_string
        )
    except _der.DERError as exc:
        raise CertificateParseError(f"malformed TBSCertificate: {exc}") from None
    assert tbs is not None  # the extension was found above
    try:
        key.verify(signature, tbs)
    except InvalidSignature:
        raise NodeSignatureError(f"node signature of {node_id} is invalid") from None


def _check_issued_by(
    cert: x509.Certificate, node_id: NodeId, issuer: x509.Certificate, issuer_id: NodeId
) -> None:
    if cert.issuer != issuer.subject:
        raise CertificateChainError(
            f"certificate of {node_id} was not issued by the next certificate ({issuer_id})"
        )
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, Ed25519PublicKey)  # checked by _check_certificate
    try:
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature:
        raise CertificateSignatureError(
            f"signature of {issuer_id} over the certificate of {node_id} is invalid"
        ) from None


def _check_certificate(cert: x509.Certificate, now: datetime.datetime) -> NodeId:
    key = _ed25519_key(cert)
    node_id = _node_id(cert, key)
    _check_validity(cert, now, node_id)
    _check_node_signature(cert, key, node_id)
    return node_id


def _check_self_issued(cert: x509.Certificate, node_id: NodeId) -> None:
    # The root of a chain is self-issued unless its ancestors were pruned
    # for expiry; then there is no issuer left to check, as in Polykey.
    if cert.issuer == cert.subject:
        _check_issued_by(cert, node_id, cert, node_id)


def verify_certificate(
    cert: bytes | x509.Certificate, *, now: datetime.datetime | None = None
) -> NodeId:
    """Check one certificate on its own and return its NodeId.

    Checks: DER, Ed25519 key and signature algorithm, CN equal to the key's
    NodeId, validity at ``now``, node signature, and the issuer signature
    when the certificate is self-issued.
    """
    certificate = load_certificate(cert)
    node_id = _check_certificate(certificate, _utc_seconds(now))
    _check_self_issued(certificate, node_id)
    return node_id


def verify_chain(
    der_list: Sequence[bytes | x509.Certificate],
    expected: NodeId | Iterable[NodeId] | None = None,
    now: datetime.datetime | None = None,
) -> NodeId:
    """Verify a peer's chain (leaf first); return the leaf's NodeId.

    Without ``expected`` (a server checking a client) every certificate and
    every link is checked. With ``expected`` (a client that dialled known
    NodeIds) the chain is walked from the leaf to the first certificate
    whose NodeId is expected, checking each certificate and each link on the
    way; certificates beyond it are not looked at. Each check failing raises
    its own :class:`~polykey.keys.CertificateError` subclass.
    """
    if isinstance(expected, NodeId):
        wanted: frozenset[NodeId] | None = frozenset((expected,))
    elif expected is None:
        wanted = None
    else:
        wanted = frozenset(expected)
        if not wanted:
            raise ValueError("expected must name at least one NodeId")
        if not all(isinstance(n, NodeId) for n in wanted):
            raise TypeError("expected must hold NodeIds")
    if len(der_list) == 0:
        raise CertificateChainEmptyError("peer presented no certificate")
    if len(der_list) > MAX_CHAIN_LENGTH:
        raise CertificateChainError(
            f"certificate chain has {len(der_list)} certificates, at most "
            f"{MAX_CHAIN_LENGTH} are accepted"
        )
    at = _utc_seconds(now)
    certs = [load_certificate(item) for item in der_list]
    ids: list[NodeId] = []
    for index, cert in enumerate(certs):
        node_id = _check_certificate(cert, at)
        ids.append(node_id)
        if index > 0:
            _check_issued_by(certs[index - 1], ids[index - 1], cert, node_id)
        if wanted is not None and node_id in wanted:
            break
    else:
        if wanted is not None:
            shown = ", ".join(sorted(str(n) for n in wanted)[:3])
            more = "" if len(wanted) <= 3 else f" (and {len(wanted) - 3} more)"
            raise NodeIdMismatchError(
                f"certificate chain of {ids[0]} does not lead to an expected NodeId: "
                f"{shown}{more}"
            )
    _check_self_issued(certs[len(ids) - 1], ids[-1])
    return ids[0]
