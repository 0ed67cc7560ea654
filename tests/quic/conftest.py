from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID


def plain_identity(name: str, *, kind: str = "ed25519") -> tuple[bytes, bytes]:
    """A self-signed certificate (DER) and key (PKCS8 DER) that is not a
    node certificate: enough for binding tests that do not verify peers."""
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        algorithm = None
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        from cryptography.hazmat.primitives import hashes

        algorithm = hashes.SHA256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return (
        cert.public_bytes(serialization.Encoding.DER),
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.fixture(scope="session")
def server_identity() -> tuple[bytes, bytes]:
    return plain_identity("server")


@pytest.fixture(scope="session")
def client_identity() -> tuple[bytes, bytes]:
    return plain_identity("client")
