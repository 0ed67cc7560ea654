from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from polykey.keys import (
    KeyFileError,
    KeyPair,
    NodeId,
    load_key_pair,
    load_or_generate_key_pair,
    save_key_pair,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_and_node_id() -> None:
    key_pair = KeyPair.generate()
    assert isinstance(key_pair.node_id, NodeId)
    assert key_pair.node_id.raw == key_pair.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert KeyPair.generate().node_id != key_pair.node_id
    signature = key_pair.sign(b"data")
    key_pair.node_id.public_key().verify(signature, b"data")


def test_seed_is_deterministic_and_repr_hides_key() -> None:
    a = KeyPair.from_seed(bytes(range(32)))
    b = KeyPair.from_seed(bytes(range(32)))
    assert a == b
    assert hash(a) == hash(b)
    assert repr(a) == f"KeyPair(node_id={a.node_id})"
    assert a.private_key_der().hex() not in repr(a)
    with pytest.raises(TypeError):
        KeyPair(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


def test_pem_der_round_trip() -> None:
    key_pair = KeyPair.generate()
    assert key_pair.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert KeyPair.from_pem(key_pair.private_key_pem()) == key_pair
    assert KeyPair.from_der(key_pair.private_key_der()) == key_pair
    encrypted = key_pair.private_key_pem(b"pw")
    assert b"ENCRYPTED" in encrypted
    assert KeyPair.from_pem(encrypted, b"pw") == key_pair
    assert key_pair.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_save_load_round_trip_with_permissions(tmp_path: Path) -> None:
    state = tmp_path / "state" / "keys"
    path = state / "node.key"
    key_pair = KeyPair.generate()
    save_key_pair(key_pair, path)
    assert _mode(path) == 0o600
    assert _mode(state) == 0o700
    assert load_key_pair(path) == key_pair
    # Overwrite atomically: no temporary files are left behind.
    other = KeyPair.generate()
    save_key_pair(other, path)
    assert load_key_pair(path) == other
    assert _mode(path) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["node.key"]


def test_save_respects_restrictive_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        save_key_pair(KeyPair.generate(), tmp_path / "new" / "k")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new" / "k") == 0o600
    assert _mode(tmp_path / "new") == 0o700


def test_save_with_password(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key_pair = KeyPair.generate()
    save_key_pair(key_pair, path, password=b"secret")
    assert load_key_pair(path, password=b"secret") == key_pair
    with pytest.raises(KeyFileError, match="encrypted and no password"):
        load_key_pair(path)
    with pytest.raises(KeyFileError, match="password is wrong"):
        load_key_pair(path, password=b"wrong")
    save_key_pair(key_pair, path)
    with pytest.raises(KeyFileError, match="not encrypted but a password"):
        load_key_pair(path, password=b"secret")


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key_pair(tmp_path / "absent")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_load_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="corrupt") as info:
        load_key_pair(path)
    assert "AAAA" not in str(info.value)


def test_load_truncated(tmp_path: Path) -> None:
    path = tmp_path / "k"
    pem = KeyPair.generate().private_key_pem()
    path.write_bytes(pem[: len(pem) // 2])
    with pytest.raises(KeyFileError, match="corrupt") as info:
        load_key_pair(path)
    assert pem[28:60].decode() not in str(info.value)


def test_load_wrong_key_type(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_key_pair(path)


def test_load_unreadable_is_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot be read"):
        load_key_pair(tmp_path)  # a directory


def test_load_or_generate(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    key_pair, created = load_or_generate_key_pair(path)
    assert created
    again, created = load_or_generate_key_pair(path)
    assert not created
    assert again == key_pair
    path.write_bytes(b"corrupt")
    with pytest.raises(KeyFileError):
        load_or_generate_key_pair(path)  # never silently replaced
