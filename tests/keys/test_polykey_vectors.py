"""Compatibility with certificates and NodeIds made by Polykey itself.

fixtures/polykey_chain.json was written by ``fixtures/polykey_interop.mjs
generate`` with the npm package polykey 1.15.1: two fresh key pairs, a
self-issued certificate for the first and a renewed certificate for the
second issued by the first, exactly as Polykey's CertManager makes them.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from polykey.keys import (
    CertChain,
    CertificateSignatureError,
    KeyPair,
    NodeId,
    NodeIdentity,
    NodeIdMismatchError,
    NodeSignatureError,
    generate_certificate,
    verify_chain,
)

FIXTURES = Path(__file__).parent / "fixtures"
VECTORS: dict[str, Any] = json.loads((FIXTURES / "polykey_chain.json").read_text())
GENERATED_AT = datetime.datetime.fromisoformat(
    VECTORS["generated_at"].replace("Z", "+00:00")
)
OLD_ID = NodeId.from_string(VECTORS["node_ids"]["old"])
NEW_ID = NodeId.from_string(VECTORS["node_ids"]["new"])


def polykey_ders() -> list[bytes]:
    return CertChain.from_pem("".join(VECTORS["chain_pem"]).encode()).to_der_list()


def test_fixture_was_sound_for_polykey() -> None:
    assert VECTORS["polykey_checks"] == {
        "node_signed": [True, True],
        "new_signed_by_old": True,
        "new_issued_by_old": True,
    }


@pytest.mark.parametrize("which", ["old", "new"])
def test_node_id_encoding_matches_polykey(which: str) -> None:
    raw = bytes.fromhex(VECTORS["public_keys_hex"][which])
    encoded = VECTORS["node_ids"][which]
    assert str(NodeId(raw)) == encoded
    assert NodeId.from_string(encoded).raw == raw
    key_pair = KeyPair.from_pem(VECTORS["private_key_pem"][which].encode())
    assert str(key_pair.node_id) == encoded


def test_verify_polykey_chain() -> None:
    ders = polykey_ders()
    assert verify_chain(ders, now=GENERATED_AT) == NEW_ID
    assert verify_chain(ders, expected=OLD_ID, now=GENERATED_AT) == NEW_ID
    assert verify_chain(ders, expected=NEW_ID, now=GENERATED_AT) == NEW_ID
    assert verify_chain(ders[1:], now=GENERATED_AT) == OLD_ID
    other = KeyPair.generate().node_id
    with pytest.raises(NodeIdMismatchError):
        verify_chain(ders, expected=other, now=GENERATED_AT)


def test_tampered_polykey_chain_is_rejected() -> None:
    leaf, root = polykey_ders()
    bad_signature = leaf[:-1] + bytes([leaf[-1] ^ 1])
    with pytest.raises(CertificateSignatureError):
        verify_chain([bad_signature, root], now=GENERATED_AT)
    cert = x509.load_der_x509_certificate(leaf)
    value = cert.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.2")
    ).value
    assert isinstance(value, x509.UnrecognizedExtension)
    at = leaf.index(value.value) + 5
    bad_node_signature = leaf[:at] + bytes([leaf[at] ^ 1]) + leaf[at + 1 :]
    with pytest.raises(NodeSignatureError):
        verify_chain([bad_node_signature, root], now=GENERATED_AT)


def test_we_generate_byte_identical_certificates() -> None:
    # Ed25519 signatures are deterministic: given Polykey's keys, serials,
    # time and version string we must produce exactly Polykey's bytes.
    old = KeyPair.from_pem(VECTORS["private_key_pem"]["old"].encode())
    new = KeyPair.from_pem(VECTORS["private_key_pem"]["new"].encode())
    leaf, root = polykey_ders()
    duration = datetime.timedelta(seconds=VECTORS["duration_seconds"])
    for subject, issuer, theirs in [(old, old, root), (new, old, leaf)]:
        ours = generate_certificate(
            subject,
            issuer,
            duration=duration,
            now=GENERATED_AT,
            version=VECTORS["polykey_version"],
            serial=x509.load_der_x509_certificate(theirs).serial_number,
        )
        assert ours.public_bytes(Encoding.DER) == theirs


def _interop_dir() -> Path | None:
    """Where Polykey's npm package is installed: $POLYKEY_INTEROP_DIR, or
    tests/interop/polykey (which `make test` installs)."""
    default = Path(__file__).resolve().parents[1] / "interop" / "polykey"
    directory = os.environ.get("POLYKEY_INTEROP_DIR") or str(default)
    if shutil.which("node") is None:
        return None
    path = Path(directory)
    return path if (path / "node_modules" / "polykey").is_dir() else None


@pytest.mark.interop
@pytest.mark.skipif(
    _interop_dir() is None,
    reason="Polykey's npm package is not installed (make test installs it in tests/interop/polykey)",
)
def test_polykey_verifies_our_chain() -> None:
    directory = _interop_dir()
    assert directory is not None
    old = NodeIdentity.generate()
    renewed = old.renew()
    stranger = KeyPair.generate().node_id
    request = {
        "chain": [base64.b64encode(d).decode() for d in renewed.cert_chain_der()],
        "expected": [str(old.node_id), str(renewed.node_id), str(stranger)],
    }
    result = subprocess.run(
        ["node", str(FIXTURES / "polykey_interop.mjs"), "verify"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=60,
        check=True,
    )
    answer = json.loads(result.stdout)
    assert answer["parsed"] == [True, True]
    assert answer["node_ids"] == [str(renewed.node_id), str(old.node_id)]
    assert answer["node_signed"] == [True, True]
    assert answer["signed_by_next"] == [True]
    assert answer["issued_by_next"] == [True]
    assert answer["client_chain"] == "success"
    assert answer["server_chain"] == {
        str(old.node_id): f"success:{old.node_id}",
        str(renewed.node_id): f"success:{renewed.node_id}",
        str(stranger): "fail:298",  # bad_certificate
    }
