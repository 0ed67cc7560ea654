from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from polykey.keys import _der

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "der test")])
WHEN = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def _builder(extension_values: list[tuple[str, bytes]]) -> x509.CertificateBuilder:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    builder = (
        x509.CertificateBuilder()
        .serial_number(1)
        .issuer_name(NAME)
        .subject_name(NAME)
        .public_key(key.public_key())
        .not_valid_before(WHEN)
        .not_valid_after(WHEN)
    )
    for oid, value in extension_values:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value),
            critical=False,
        )
    return builder


def _tbs(extension_values: list[tuple[str, bytes]]) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    return _builder(extension_values).sign(key, None).tbs_certificate_bytes


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8180"),
        (255, "81ff"),
        (256, "820100"),
        (65536, "83010000"),
    ],
)
def test_encode_length(length: int, encoded: str) -> None:
    assert _der.encode_length(length).hex() == encoded


@given(st.binary(max_size=70000))
def test_tlv_round_trip(content: bytes) -> None:
    data = _der.encode_tlv(0x04, content)
    tlv = _der.read_tlv(data)
    assert (tlv.tag, tlv.end) == (0x04, len(data))
    assert tlv.content(data) == content


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("04", "truncated DER header"),
        ("0480", "indefinite"),
        ("048100", "non-minimal"),
        ("04820005" + "00" * 5, "non-minimal"),
        ("0485" + "00" * 5, "too large"),
        ("048201", "truncated DER length"),
        ("0405abcd", "runs past"),
        ("1f0100", "high tag"),
    ],
)
def test_read_tlv_rejects(data: str, message: str) -> None:
    with pytest.raises(_der.DERError, match=message):
        _der.read_tlv(bytes.fromhex(data))


@pytest.mark.parametrize(
    ("oid", "content"),
    [
        ("1.2.840.113549", "2a864886f70d"),
        ("2.5.29.19", "551d13"),
        ("1.3.6.1.4.1.57167.2.2.2", "2b0601040183be4f020202"),
    ],
)
def test_oid_content(oid: str, content: str) -> None:
    assert _der.oid_content(oid).hex() == content


def test_oid_content_matches_cryptography() -> None:
    # An extension's OID bytes as cryptography writes them.
    tbs = _tbs([("1.3.6.1.4.1.57167.2.2.2", b"\x04\x00")])
    assert _der.encode_tlv(0x06, _der.oid_content("1.3.6.1.4.1.57167.2.2.2")) in tbs


@pytest.mark.parametrize("position", [0, 1, 2])
def test_remove_extension_equals_building_without_it(position: int) -> None:
    target = "1.2.3.4.5"
    others = [("1.2.3.4.1", b"\x05\x00"), ("1.2.3.4.2", b"\x04\x03abc")]
    # Large values push lengths into their long forms.
    others.append(("1.2.3.4.3", b"\x04\x82\x01\x00" + bytes(256)))
    with_target = list(others)
    with_target.insert(position, (target, b"\x04\x40" + bytes(64)))
    assert _der.remove_extension(_tbs(with_target), target) == _tbs(others)


def test_remove_only_extension_leaves_empty_sequence() -> None:
    tbs = _tbs([("1.2.3.4.5", b"\x05\x00")])
    stripped = _der.remove_extension(tbs, "1.2.3.4.5")
    assert stripped is not None
    assert stripped.endswith(bytes.fromhex("a3023000"))


def test_remove_absent_extension() -> None:
    assert (
        _der.remove_extension(_tbs([("1.2.3.4.1", b"\x05\x00")]), "1.2.3.4.5") is None
    )
    assert _der.remove_extension(_tbs([]), "1.2.3.4.5") is None


def test_remove_extension_rejects_garbage() -> None:
    tbs = _tbs([("1.2.3.4.5", b"\x05\x00")])
    with pytest.raises(_der.DERError):
        _der.remove_extension(tbs[:-1], "1.2.3.4.5")
    with pytest.raises(_der.DERError):
        _der.remove_extension(tbs + b"\x00", "1.2.3.4.5")
    with pytest.raises(_der.DERError):
        _der.remove_extension(b"\x04\x00", "1.2.3.4.5")
