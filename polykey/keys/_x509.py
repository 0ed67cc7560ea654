"""Node certificates in Polykey's format: generation, chains, identity.

Theory of operation
-------------------
A Polykey node certificate is an X.509 v3 certificate signed with Ed25519
whose subject (and issuer) is ``CN=<encoded NodeId>``. Besides the usual
extensions (all non-critical, in this order: BasicConstraints CA,
KeyUsage, ExtendedKeyUsage, SubjectAltName, SubjectKeyIdentifier) it has
two of Polykey's own:

* ``1.3.6.1.4.1.57167.2.2.1``: the software version, an IA5String;
* ``1.3.6.1.4.1.57167.2.2.2``: the node signature, an OCTET STRING holding
  the *subject* key's Ed25519 signature over the TBSCertificate as it is
  without this extension. It is always the last extension.

The certificate as a whole is signed by the *issuer* key. A fresh node
issues its own certificate; after a key renewal the new certificate is
issued by the old key, so the chain (leaf first) proves that the new NodeId
descends from the old one. The node signature proves that the subject key
itself agreed to the certificate, which the issuer signature alone cannot.

``cryptography`` cannot produce a TBSCertificate without signing it, so we
build the certificate once without the node signature extension, sign its
TBS bytes with the subject key, then build it again with identical fields
plus the extension and sign that with the issuer key. A verifier strips the
extension from the final TBS (``_der.remove_extension``) and checks the
signature over what is left; we check at generation time that this gives
back exactly the bytes that were signed.

How chains are checked is in ``_verify``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import __version__
from . import _der
from ._errors import CertificateParseError, KeyFileError
from ._identity import KeyPair, write_file_atomic
from ._node_id import NodeId
from ._verify import (
    NODE_SIGNATURE_OID,
    POLYKEY_VERSION_OID,
    _ed25519_key,
    _utc,
    load_certificate,
    verify_chain,
)

__all__ = [
    "CERT_VERSION",
    "DEFAULT_CERT_DURATION",
    "CertChain",
    "NodeIdentity",
    "generate_certificate",
    "load_cert_chain",
    "save_cert_chain",
]

# Polykey's default certDuration: 31536000 s (365 days).
DEFAULT_CERT_DURATION: Final = datetime.timedelta(days=365)
# Written to the version extension. Polykey writes its package version and
# never reads it back; we say who we are rather than pretend to be Polykey.
CERT_VERSION: Final = f"polykey-py/{__version__}"


# ---------------------------------------------------------------- generation


def _name(node_id: NodeId) -> x509.Name:
    # PrintableString, as @peculiar/x509 encodes CN (the NodeId alphabet is
    # printable); cryptography would default to UTF8String.
    return x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, str(node_id), _type=_ASN1Type.PrintableString
            )
        ]
    )


def _cert_serial(now: datetime.datetime) -> int:
    """A 128-bit serial laid out like Polykey's CertId (IdSortable).

    36 bits of Unix seconds, 12 bits of sub-second fraction, version 7,
    12 random bits, variant 0b10, 62 random bits: sortable by issue time and
    decodable by Polykey's ``certCertId``.
    """
    timestamp = now.timestamp()
    seconds = int(timestamp) & ((1 << 36) - 1)
    fraction = int((timestamp % 1) * 4096) & 0xFFF
    rand = int.from_bytes(os.urandom(10), "big")
    sequence = rand >> 68  # 12 bits
    tail = rand & ((1 << 62) - 1)
    value = (seconds << 92) | (fraction << 80) | (0x7 << 76) | (sequence << 64)
    return value | (0b10 << 62) | tail


def generate_certificate(
    subject: KeyPair,
    issuer: KeyPair,
    *,
    duration: datetime.timedelta = DEFAULT_CERT_DURATION,
    now: datetime.datetime | None = None,
    version: str = CERT_VERSION,
    serial: int | None = None,
) -> x509.Certificate:
    """Issue a Polykey node certificate for ``subject``, signed by ``issuer``.

    Pass the same key pair twice for a self-issued certificate. Validity
    starts at ``now`` truncated to the second (X.509 UTCTime has no
    fraction) and lasts ``duration``, also truncated to whole seconds.
    ``serial`` defaults to a fresh CertId-like value; Ed25519 signing is
    deterministic, so with the same inputs the output is byte-identical to
    Polykey's (which the tests check).
    """
    now = _utc(now)
    if duration < datetime.timedelta(0):
        raise ValueError("duration must not be negative")
    if not version.isascii():
        raise ValueError("version must be ASCII (it is an IA5String)")
    not_before = now.replace(microsecond=0)
    not_after = not_before + datetime.timedelta(seconds=int(duration.total_seconds()))
    subject_id = str(subject.node_id)
    builder = (
        x509.CertificateBuilder()
        .serial_number(_cert_serial(now) if serial is None else serial)
        .issuer_name(_name(issuer.node_id))
        .subject_name(_name(subject.node_id))
        .public_key(subject.public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # nonRepudiation
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    ExtendedKeyUsageOID.CODE_SIGNING,
                    ExtendedKeyUsageOID.EMAIL_PROTECTION,
                    ExtendedKeyUsageOID.TIME_STAMPING,
                    ExtendedKeyUsageOID.OCSP_SIGNING,
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(subject_id),
                    x509.UniformResourceIdentifier(f"pk://{subject_id}"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.IPAddress(ipaddress.IPv6Address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject.public_key),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(
                POLYKEY_VERSION_OID,
                _der.encode_tlv(_der.TAG_IA5_STRING, version.encode("ascii")),
            ),
            critical=False,
        )
    )
    # Any key would do to get the TBS bytes; the subject's is at hand.
    unsigned_tbs = builder.sign(subject.private_key, None).tbs_certificate_bytes
    node_signature = subject.sign(unsigned_tbs)
    cert = builder.add_extension(
        x509.UnrecognizedExtension(
            NODE_SIGNATURE_OID, _der.encode_tlv(_der.TAG_OCTET_STRING, node_signature)
        ),
        critical=False,
    ).sign(issuer.private_key, None)
    # The invariant every verifier relies on; cheap, so always checked.
    stripped = _der.remove_extension(
        cert.tbs_certificate_bytes, NODE_SIGNATURE_OID.dotted_string
    )
    if stripped != unsigned_tbs:
        raise RuntimeError(
            "node signature TBS does not round-trip; cryptography changed?"
        )
    return cert


# ------------------------------------------------------------ chains, identity


def _cert_tuple(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    return tuple(certs)


def _non_empty(
    instance: object, attribute: object, value: tuple[x509.Certificate, ...]
) -> None:
    if not value:
        raise ValueError("a certificate chain needs at least one certificate")


@attrs.frozen
class CertChain:
    """A node's certificates, leaf (current) first, then older ones."""

    certificates: tuple[x509.Certificate, ...] = attrs.field(
        converter=_cert_tuple, validator=_non_empty
    )

    @classmethod
    def from_der_list(cls, der_list: Iterable[bytes]) -> CertChain:
        """Parse (not verify) DER certificates; raises CertificateParseError."""
        return cls(load_certificate(der) for der in der_list)

    @classmethod
    def from_pem(cls, data: bytes) -> CertChain:
        """Parse (not verify) concatenated PEM certificates, leaf first."""
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise CertificateParseError(
                f"malformed PEM certificate chain: {exc}"
            ) from None
        return cls(load_certificate(cert.public_bytes(Encoding.DER)) for cert in certs)

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def node_id(self) -> NodeId:
        """NodeId of the leaf's key (unverified; see :meth:`verify`)."""
        key = _ed25519_key(self.leaf)
        return NodeId.from_public_key(key)

    def node_ids(self) -> list[NodeId]:
        """The NodeIds of every certificate's key, leaf first: the node's
        current NodeId, then the ones it had before renewals (unverified)."""
        return [NodeId.from_public_key(_ed25519_key(c)) for c in self.certificates]

    def to_der_list(self) -> list[bytes]:
        return [cert.public_bytes(Encoding.DER) for cert in self.certificates]

    def to_pem(self) -> bytes:
        return b"".join(cert.public_bytes(Encoding.PEM) for cert in self.certificates)

    def verify(
        self,
        expected: NodeId | Iterable[NodeId] | None = None,
        now: datetime.datetime | None = None,
    ) -> NodeId:
        return verify_chain(self.certificates, expected, now)

    def without_expired(self, now: datetime.datetime | None = None) -> CertChain:
        """Drop expired certificates after the leaf (like Polykey's gcCerts)."""
        at = _utc(now)
        rest = [c for c in self.certificates[1:] if c.not_valid_after_utc >= at]
        return CertChain((self.leaf, *rest))

    def __len__(self) -> int:
        return len(self.certificates)


@attrs.frozen
class NodeIdentity:
    """A node's key pair together with its certificate chain.

    This is what the QUIC layer loads into TLS: :meth:`cert_chain_pem` /
    :meth:`cert_chain_der` and :meth:`private_key_pem` /
    :meth:`private_key_der`.
    """

    key_pair: KeyPair
    chain: CertChain

    def __attrs_post_init__(self) -> None:
        if self.chain.node_id != self.key_pair.node_id:
            raise ValueError("the chain's leaf certificate is not for this key pair")

    @classmethod
    def generate(
        cls,
        key_pair: KeyPair | None = None,
        *,
        duration: datetime.timedelta = DEFAULT_CERT_DURATION,
        now: datetime.datetime | None = None,
    ) -> NodeIdentity:
        """A self-issued certificate for ``key_pair`` (a new key if None)."""
        if key_pair is None:
            key_pair = KeyPair.generate()
        cert = generate_certificate(key_pair, key_pair, duration=duration, now=now)
        return cls(key_pair, CertChain((cert,)))

    def renew(
        self,
        new_key_pair: KeyPair | None = None,
        *,
        duration: datetime.timedelta = DEFAULT_CERT_DURATION,
        now: datetime.datetime | None = None,
    ) -> NodeIdentity:
        """Move to a new key: its certificate is issued by the current key.

        The new leaf goes in front of the current chain, whose expired
        certificates are dropped. Peers that know the old NodeId can follow
        the chain to it. Passing the current key pair renews the certificate
        without changing the NodeId.
        """
        if new_key_pair is None:
            new_key_pair = KeyPair.generate()
        cert = generate_certificate(
            new_key_pair, self.key_pair, duration=duration, now=now
        )
        chain = CertChain((cert, *self.chain.certificates)).without_expired(now)
        return NodeIdentity(new_key_pair, chain)

    @property
    def node_id(self) -> NodeId:
        return self.key_pair.node_id

    def cert_chain_pem(self) -> bytes:
        return self.chain.to_pem()

    def cert_chain_der(self) -> list[bytes]:
        return self.chain.to_der_list()

    def private_key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM."""
        return self.key_pair.private_key_pem()

    def private_key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER."""
        return self.key_pair.private_key_der()


def save_cert_chain(chain: CertChain, path: str | os.PathLike[str]) -> None:
    """Write the chain as concatenated PEM, atomically (mode 0600)."""
    write_file_atomic(path, chain.to_pem())


def load_cert_chain(path: str | os.PathLike[str]) -> CertChain:
    """Read a chain written by :func:`save_cert_chain` (parsed, not verified)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"certificate file {os.fspath(path)!r} does not exist"
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"certificate file {os.fspath(path)!r} cannot be read: {exc.strerror}"
        ) from None
    return CertChain.from_pem(data)
