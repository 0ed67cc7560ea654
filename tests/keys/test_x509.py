from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from polykey.keys import (
    CERT_VERSION,
    MAX_CHAIN_LENGTH,
    NODE_SIGNATURE_OID,
    POLYKEY_VERSION_OID,
    CertChain,
    CertificateChainEmptyError,
    CertificateChainError,
    CertificateError,
    CertificateExpiredError,
    CertificateIdentityError,
    CertificateKeyTypeError,
    CertificateNotYetValidError,
    CertificateParseError,
    CertificateSignatureError,
    CertificateValidityError,
    KeyPair,
    NodeId,
    NodeIdentity,
    NodeIdMismatchError,
    NodeSignatureError,
    _der,
    generate_certificate,
    load_cert_chain,
    save_cert_chain,
    verify_certificate,
    verify_chain,
)

NOW = datetime.datetime(2030, 6, 1, 12, 0, 0, 250000, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
SECOND = datetime.timedelta(seconds=1)
OLD = KeyPair.from_seed(b"\x01" * 32)
NEW = KeyPair.from_seed(b"\x02" * 32)
OTHER = KeyPair.from_seed(b"\x03" * 32)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def old_identity() -> NodeIdentity:
    return NodeIdentity.generate(OLD, now=NOW)


@pytest.fixture(scope="module")
def renewed(old_identity: NodeIdentity) -> NodeIdentity:
    return old_identity.renew(NEW, now=NOW + DAY)


def build(
    subject: KeyPair,
    issuer: KeyPair,
    *,
    cn: str | None = None,
    node_signature: str | bytes = "valid",
    not_before: datetime.datetime = NOW - 10 * DAY,
    not_after: datetime.datetime = NOW + 10 * DAY,
) -> x509.Certificate:
    """A certificate with chosen defects, signed properly by ``issuer``."""

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    builder = (
        x509.CertificateBuilder()
        .serial_number(7)
        .subject_name(name(cn or str(subject.node_id)))
        .issuer_name(name(str(issuer.node_id)))
        .public_key(subject.public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
    )
    if node_signature != "missing":
        tbs = builder.sign(subject.private_key, None).tbs_certificate_bytes
        if node_signature == "valid":
            signature = subject.sign(tbs)
        elif node_signature == "issuer":
            signature = issuer.sign(tbs)
        else:
            assert isinstance(node_signature, bytes)
            signature = node_signature
        builder = builder.add_extension(
            x509.UnrecognizedExtension(
                NODE_SIGNATURE_OID, _der.encode_tlv(_der.TAG_OCTET_STRING, signature)
            ),
            critical=False,
        )
    return builder.sign(issuer.private_key, None)


def flip_signature_bit(cert_der: bytes) -> bytes:
    # The signature value is the last 64 bytes of an Ed25519 certificate.
    return cert_der[:-1] + bytes([cert_der[-1] ^ 0x01])


# -- generation ---------------------------------------------------------------


def test_generate_and_verify(old_identity: NodeIdentity) -> None:
    ders = old_identity.cert_chain_der()
    assert len(ders) == 1
    assert verify_chain(ders, now=NOW) == OLD.node_id
    assert verify_chain(ders, expected=OLD.node_id, now=NOW) == OLD.node_id
    assert verify_certificate(ders[0], now=NOW) == OLD.node_id
    assert old_identity.chain.verify(now=NOW) == OLD.node_id
    assert old_identity.node_id == old_identity.chain.node_id == OLD.node_id


def test_certificate_fields_follow_polykey(old_identity: NodeIdentity) -> None:
    cert = old_identity.chain.leaf
    node_id = str(OLD.node_id)
    expected_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    assert cert.subject == cert.issuer == expected_name
    assert cert.version is x509.Version.v3
    # Validity is truncated to the second; Polykey's default is 365 days.
    assert cert.not_valid_before_utc == NOW.replace(microsecond=0)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(
        seconds=31536000
    )
    assert 0 < cert.serial_number < 1 << 128
    assert (cert.serial_number >> 92) == int(NOW.timestamp())  # CertId layout
    extensions = list(cert.extensions)
    assert [e.oid.dotted_string for e in extensions] == [
        "2.5.29.19",  # basicConstraints
        "2.5.29.15",  # keyUsage
        "2.5.29.37",  # extKeyUsage
        "2.5.29.17",  # subjectAltName
        "2.5.29.14",  # subjectKeyIdentifier
        POLYKEY_VERSION_OID.dotted_string,
        NODE_SIGNATURE_OID.dotted_string,
    ]
    assert not any(e.critical for e in extensions)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca
    assert basic.path_length is None
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.content_commitment
    assert usage.key_cert_sign
    assert usage.key_encipherment
    assert usage.data_encipherment
    assert usage.key_agreement
    assert usage.crl_sign
    assert list(
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.CODE_SIGNING,
        ExtendedKeyUsageOID.EMAIL_PROTECTION,
        ExtendedKeyUsageOID.TIME_STAMPING,
        ExtendedKeyUsageOID.OCSP_SIGNING,
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in san] == [
        f"<DNSName(value='{node_id}')>",
        f"<UniformResourceIdentifier(value='pk://{node_id}')>",
        "<IPAddress(value=127.0.0.1)>",
        "<IPAddress(value=::1)>",
    ]
    version = cert.extensions.get_extension_for_oid(POLYKEY_VERSION_OID).value
    assert isinstance(version, x509.UnrecognizedExtension)
    assert version.value == _der.encode_tlv(0x16, CERT_VERSION.encode())
    # CN is a PrintableString (tag 0x13), as @peculiar/x509 writes it.
    assert b"\x13\x35" + node_id.encode() in der(cert)


def test_node_signature_covers_tbs_without_it(old_identity: NodeIdentity) -> None:
    cert = old_identity.chain.leaf
    value = cert.extensions.get_extension_for_oid(NODE_SIGNATURE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    signature = _der.read_tlv(value.value).content(value.value)
    stripped = _der.remove_extension(
        cert.tbs_certificate_bytes, NODE_SIGNATURE_OID.dotted_string
    )
    assert stripped is not None
    OLD.public_key.verify(signature, stripped)


def test_generate_arguments() -> None:
    with pytest.raises(ValueError, match="negative"):
        generate_certificate(OLD, OLD, duration=-SECOND, now=NOW)
    with pytest.raises(ValueError, match="ASCII"):
        generate_certificate(OLD, OLD, now=NOW, version="é")
    with pytest.raises(ValueError, match="timezone"):
        generate_certificate(OLD, OLD, now=datetime.datetime(2030, 1, 1))
    cert = generate_certificate(OLD, OLD, duration=datetime.timedelta(0), now=NOW)
    assert verify_certificate(der(cert), now=NOW) == OLD.node_id


# -- chains --------------------------------------------------------------------


def test_renewed_chain(renewed: NodeIdentity) -> None:
    ders = renewed.cert_chain_der()
    assert len(ders) == 2
    assert renewed.node_id == NEW.node_id
    leaf = renewed.chain.leaf
    assert leaf.issuer == renewed.chain.certificates[1].subject
    at = NOW + DAY
    assert verify_chain(ders, now=at) == NEW.node_id
    # A client that dialled the old NodeId follows the chain to it.
    assert verify_chain(ders, expected=OLD.node_id, now=at) == NEW.node_id
    assert verify_chain(ders, expected=NEW.node_id, now=at) == NEW.node_id
    assert (
        verify_chain(ders, expected={OTHER.node_id, OLD.node_id}, now=at) == NEW.node_id
    )
    assert verify_chain(ders, expected=[OLD.node_id], now=at) == NEW.node_id


def test_wrong_expected_node_id(renewed: NodeIdentity) -> None:
    with pytest.raises(NodeIdMismatchError, match=str(OTHER.node_id)) as info:
        verify_chain(renewed.cert_chain_der(), expected=OTHER.node_id, now=NOW + DAY)
    assert info.value.tls_alert == 42
    with pytest.raises(ValueError, match="at least one"):
        verify_chain(renewed.cert_chain_der(), expected=[], now=NOW + DAY)


def test_walk_stops_at_expected(renewed: NodeIdentity) -> None:
    # Past the old certificate's end the new one is still valid: a client
    # that expects the new NodeId never looks at the old certificate...
    at = NOW + 365 * DAY + 12 * 3600 * SECOND
    ders = renewed.cert_chain_der()
    assert verify_chain(ders, expected=NEW.node_id, now=at) == NEW.node_id
    # ...but one that needs it, or checks the whole chain, fails.
    with pytest.raises(CertificateExpiredError):
        verify_chain(ders, expected=OLD.node_id, now=at)
    with pytest.raises(CertificateExpiredError):
        verify_chain(ders, now=at)


def test_renew_prunes_expired_and_same_key_renewal(renewed: NodeIdentity) -> None:
    later = NOW + 400 * DAY
    third = renewed.renew(OTHER, now=later)
    assert len(third.chain) == 1  # both older certificates had expired
    same = renewed.renew(renewed.key_pair, now=NOW + 2 * DAY)
    assert same.node_id == NEW.node_id
    assert len(same.chain) == 3
    assert verify_chain(same.cert_chain_der(), now=NOW + 2 * DAY) == NEW.node_id
    assert (
        verify_chain(same.cert_chain_der(), expected=OLD.node_id, now=NOW + 2 * DAY)
        == NEW.node_id
    )


def test_issuer_signature_tampered(
    old_identity: NodeIdentity, renewed: NodeIdentity
) -> None:
    single = flip_signature_bit(old_identity.cert_chain_der()[0])
    with pytest.raises(CertificateSignatureError):
        verify_chain([single], now=NOW)
    with pytest.raises(CertificateSignatureError):
        verify_certificate(single, now=NOW)
    leaf, root = renewed.cert_chain_der()
    tampered = [flip_signature_bit(leaf), root]
    with pytest.raises(CertificateSignatureError):
        verify_chain(tampered, now=NOW + DAY)
    with pytest.raises(CertificateSignatureError):
        verify_chain(tampered, expected=OLD.node_id, now=NOW + DAY)
    # Issued by the wrong key, under the right name.
    forged = build(NEW, OLD)
    forged_by_other = der(forged)[:-64] + OTHER.sign(forged.tbs_certificate_bytes)
    with pytest.raises(CertificateSignatureError):
        verify_chain([forged_by_other, root], now=NOW + DAY)


def test_chain_link_name_mismatch(renewed: NodeIdentity) -> None:
    unrelated = NodeIdentity.generate(OTHER, now=NOW).cert_chain_der()[0]
    with pytest.raises(CertificateChainError, match="not issued by"):
        verify_chain([renewed.cert_chain_der()[0], unrelated], now=NOW + DAY)


def test_node_signature_tampered(old_identity: NodeIdentity) -> None:
    cert = old_identity.chain.leaf
    data = bytearray(der(cert))
    value = cert.extensions.get_extension_for_oid(NODE_SIGNATURE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    offset = bytes(data).index(value.value) + 10
    data[offset] ^= 0x01
    with pytest.raises(NodeSignatureError, match="invalid"):
        verify_chain([bytes(data)], now=NOW)


@pytest.mark.parametrize(
    ("node_signature", "message"),
    [
        ("missing", "no node signature"),
        ("issuer", "invalid"),  # signed by the issuer, not the subject
        (bytes(64), "invalid"),
        (bytes(63), "63 bytes"),
    ],
)
def test_node_signature_defects(node_signature: str | bytes, message: str) -> None:
    cert = build(NEW, OLD, node_signature=node_signature)
    with pytest.raises(NodeSignatureError, match=message):
        verify_chain([der(cert)], expected=NEW.node_id, now=NOW)


def test_node_signature_not_octet_string() -> None:
    cert = (
        x509.CertificateBuilder()
        .serial_number(1)
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(OLD.node_id))])
        )
        .issuer_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(OLD.node_id))])
        )
        .public_key(OLD.public_key)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(
            x509.UnrecognizedExtension(NODE_SIGNATURE_OID, b"\x16\x01x"), critical=False
        )
        .sign(OLD.private_key, None)
    )
    with pytest.raises(NodeSignatureError, match="OCTET STRING"):
        verify_certificate(der(cert), now=NOW)


def test_validity_bounds(old_identity: NodeIdentity) -> None:
    ders = old_identity.cert_chain_der()
    start = NOW.replace(microsecond=0)
    end = start + datetime.timedelta(seconds=31536000)
    assert verify_chain(ders, now=start) == OLD.node_id
    assert verify_chain(ders, now=end) == OLD.node_id
    with pytest.raises(CertificateNotYetValidError) as early:
        verify_chain(ders, now=start - SECOND)
    with pytest.raises(CertificateExpiredError) as late:
        verify_chain(ders, now=end + SECOND)
    for info in (early, late):
        assert isinstance(info.value, CertificateValidityError)
        assert info.value.tls_alert == 45
    with pytest.raises(ValueError, match="timezone"):
        verify_chain(ders, now=datetime.datetime(2030, 6, 1))
    # Other time zones are fine.
    tz = datetime.timezone(datetime.timedelta(hours=-7))
    assert verify_chain(ders, now=start.astimezone(tz)) == OLD.node_id


def test_default_now_is_current_time() -> None:
    fresh = NodeIdentity.generate(OTHER)
    assert verify_chain(fresh.cert_chain_der()) == OTHER.node_id
    long_ago = datetime.datetime.now(datetime.UTC) - 1000 * DAY
    old = NodeIdentity.generate(OTHER, now=long_ago).cert_chain_der()
    with pytest.raises(CertificateExpiredError):
        verify_chain(old)


def test_cn_mismatch() -> None:
    cert = build(OLD, OLD, cn=str(OTHER.node_id))
    with pytest.raises(CertificateIdentityError, match="not the NodeId of its key"):
        verify_chain([der(cert)], now=NOW)
    # Even when the claimed NodeId is the expected one.
    with pytest.raises(CertificateIdentityError):
        verify_chain([der(cert)], expected=OTHER.node_id, now=NOW)
    with pytest.raises(CertificateIdentityError, match="not a NodeId"):
        verify_chain([der(build(OLD, OLD, cn="localhost"))], now=NOW)


def test_not_ed25519() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(OLD.node_id))])
    ec_cert = (
        x509.CertificateBuilder()
        .serial_number(1)
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(ec_key, hashes.SHA256())
    )
    with pytest.raises(CertificateKeyTypeError, match="not Ed25519"):
        verify_chain([der(ec_cert)], now=NOW)
    # An Ed25519 key certified with an ECDSA signature.
    mixed = (
        x509.CertificateBuilder()
        .serial_number(1)
        .subject_name(name)
        .issuer_name(name)
        .public_key(OLD.public_key)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(ec_key, hashes.SHA256())
    )
    with pytest.raises(CertificateKeyTypeError, match="signature algorithm"):
        verify_chain([der(mixed)], now=NOW)


def test_garbage_and_truncated_der(old_identity: NodeIdentity) -> None:
    good = old_identity.cert_chain_der()[0]
    for bad in [
        b"",
        b"\x00",
        b"garbage",
        good[:-1],
        good[: len(good) // 2],
        good + b"\x00",
    ]:
        with pytest.raises(CertificateParseError):
            verify_chain([bad], now=NOW)
    with pytest.raises(CertificateParseError):
        verify_chain([good, good[:100]], now=NOW)


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_random_bytes_never_verify(data: bytes) -> None:
    with pytest.raises(CertificateError):
        verify_chain([data], now=NOW)


@settings(max_examples=150)
@given(st.data())
def test_any_single_byte_change_is_rejected(
    old_identity: NodeIdentity, data: st.DataObject
) -> None:
    good = bytearray(old_identity.cert_chain_der()[0])
    index = data.draw(st.integers(0, len(good) - 1))
    good[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CertificateError):
        verify_chain([bytes(good)], now=NOW)


def test_a_signature_with_unused_bits_is_refused(old_identity: NodeIdentity) -> None:
    # The signature BIT STRING's unused-bits byte is outside what the
    # signature covers; cryptography read 0x01 there as the same signature,
    # so a one-byte change verified (found by the test above, about one run
    # in ten: only when the signature's last bit is 0).
    from polykey.keys import _der

    der = old_identity.cert_chain_der()[0]
    outer = _der.read_tlv(der)
    signature = _der.read_children(der, outer)[2]
    assert der[signature.content_start] == 0
    for unused in (1, 7):
        bad = bytearray(der)
        bad[signature.content_start] = unused
        with pytest.raises(CertificateError, match="unused bits"):
            verify_chain([bytes(bad)], now=NOW)
    # Bytes after the certificate are refused too.
    with pytest.raises(CertificateError):
        verify_chain([der + b"\x00"], now=NOW)
    assert verify_chain([der], now=NOW) == old_identity.node_id


def test_empty_and_long_chains(old_identity: NodeIdentity) -> None:
    with pytest.raises(CertificateChainEmptyError) as info:
        verify_chain([], now=NOW)
    assert info.value.tls_alert == 116
    ders = old_identity.cert_chain_der() * (MAX_CHAIN_LENGTH + 1)
    with pytest.raises(CertificateChainError, match="at most"):
        verify_chain(ders, now=NOW)


# -- containers and files ----------------------------------------------------------


def test_chain_pem_der_round_trip(renewed: NodeIdentity, tmp_path: Path) -> None:
    chain = renewed.chain
    assert CertChain.from_der_list(chain.to_der_list()) == chain
    pem = renewed.cert_chain_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert CertChain.from_pem(pem) == chain
    path = tmp_path / "state" / "certs.pem"
    save_cert_chain(chain, path)
    assert load_cert_chain(path) == chain
    with pytest.raises(CertificateParseError):
        CertChain.from_pem(b"not pem")
    with pytest.raises(ValueError, match="at least one"):
        CertChain(())


def test_identity_accessors(renewed: NodeIdentity) -> None:
    assert KeyPair.from_pem(renewed.private_key_pem()) == NEW
    assert KeyPair.from_der(renewed.private_key_der()) == NEW
    assert renewed.cert_chain_der() == renewed.chain.to_der_list()
    with pytest.raises(ValueError, match="not for this key pair"):
        NodeIdentity(OTHER, renewed.chain)
    assert isinstance(NodeIdentity.generate().node_id, NodeId)
