from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from polykey.keys import (
    NODE_ID_LENGTH,
    NODE_ID_STRING_LENGTH,
    KeyPair,
    NodeId,
    NodeIdError,
    bucket_index,
    node_distance,
)
from polykey.keys._node_id import b32hex_decode, b32hex_encode

raw_ids = st.binary(min_size=NODE_ID_LENGTH, max_size=NODE_ID_LENGTH)
node_ids = raw_ids.map(NodeId)
ALPHABET = "0123456789abcdefghijklmnopqrstuv"


# -- base32hex ---------------------------------------------------------------

# Multibase spec vectors ("basic.csv", "rfc4648.csv") for the `v` encoding,
# as js-multiformats tests them.
MULTIBASE_VECTORS = [
    (b"yes mani !", "vf5in683dc5n6i811"),
    (b"f", "vco"),
    (b"fo", "vcpng"),
    (b"foo", "vcpnmu"),
    (b"foob", "vcpnmuog"),
    (b"fooba", "vcpnmuoj1"),
    (b"foobar", "vcpnmuoj1e8"),
    (b"", "v"),
]


@pytest.mark.parametrize(("data", "encoded"), MULTIBASE_VECTORS)
def test_b32hex_multibase_vectors(data: bytes, encoded: str) -> None:
    assert "v" + b32hex_encode(data) == encoded
    assert b32hex_decode(encoded[1:]) == data


@given(st.binary(max_size=64))
def test_b32hex_round_trip_any_length(data: bytes) -> None:
    text = b32hex_encode(data)
    assert text == base64.b32hexencode(data).decode().rstrip("=").lower()
    assert b32hex_decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "CPNMUOJ1E8",  # upper case
        "cpnmuoj1e8==",  # padding
        "cpnmuoj1e9",  # non-zero pad bits
        "c",  # a lone character cannot hold a byte
        "cpn",  # 15 bits: impossible length
        "cpnmuoj1ew",  # 'w' is outside the alphabet
    ],
)
def test_b32hex_decode_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="base32hex"):
        b32hex_decode(text)


# -- NodeId encoding -----------------------------------------------------------


def test_known_vectors() -> None:
    assert str(NodeId(bytes(32))) == "v" + "0" * 52
    assert str(NodeId(b"\xff" * 32)) == "v" + "v" * 51 + "g"
    # From Polykey's own encodeNodeId (see test_polykey_vectors.py for more).
    key_hex = "09f93a8c835dd3ebb0c1dd50bb1dd924b0e83936882c6acc29ebd17a6012ae9b"
    expected = "v17sjl343bn9unc61rl8bm7ep4ioege9mh0m6lj19tf8nko0ilqdg"
    assert str(NodeId(bytes.fromhex(key_hex))) == expected
    assert NodeId.from_string(expected).raw.hex() == key_hex


@given(raw_ids)
def test_string_round_trip(raw: bytes) -> None:
    node_id = NodeId(raw)
    text = str(node_id)
    assert text == node_id.encode()
    assert len(text) == NODE_ID_STRING_LENGTH == 53
    assert text[0] == "v"
    assert set(text[1:]) <= set(ALPHABET)
    assert NodeId.from_string(text) == node_id
    assert bytes(node_id) == raw == node_id.raw
    assert NodeId.from_int(node_id.to_int()) == node_id


@given(raw_ids, st.data())
def test_from_string_rejects_mutations(raw: bytes, data: st.DataObject) -> None:
    text = str(NodeId(raw))
    position = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != text[position]))
    mutated = text[:position] + replacement + text[position + 1 :]
    try:
        parsed = NodeId.from_string(mutated)
    except NodeIdError:
        return
    # Only a different canonical id can come out of a one-character change.
    assert parsed != NodeId(raw)
    assert str(parsed) == mutated


@given(st.text(max_size=80))
@example("")
@example("v")
@example("V" + "0" * 52)
@example("z" + "0" * 52)
@example("v" + "0" * 51 + "1")  # non-zero pad bits
@example("v" + "0" * 51 + "w")
@example("v" + "0" * 53)
def test_from_string_garbage(text: str) -> None:
    try:
        node_id = NodeId.from_string(text)
    except NodeIdError:
        return
    assert str(node_id) == text  # anything accepted is canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("z" + "0" * 52, "prefix 'v'"),
        ("V" + "0" * 52, "upper-case"),
        ("v" + "0" * 51, "53 characters, got 52"),
        ("v" + "0" * 50 + "x0", "invalid base32hex character 'x' at position 50"),
        ("v" + "0" * 50 + "-0", "invalid base32hex character '-'"),
        ("v" + "0" * 51 + "1", "pad bits"),
    ],
)
def test_from_string_errors_are_specific(text: str, message: str) -> None:
    with pytest.raises(NodeIdError, match=message):
        NodeId.from_string(text)


def test_nodeid_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="prefix"):
        NodeId.from_string("nope")


def test_wrong_length_and_type() -> None:
    with pytest.raises(NodeIdError, match="32 bytes, got 31"):
        NodeId(bytes(31))
    with pytest.raises(TypeError):
        NodeId("v" + "0" * 52)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        NodeId.from_string(b"v00")  # type: ignore[arg-type]
    with pytest.raises(NodeIdError):
        NodeId.from_int(1 << 256)


def test_immutable_hashable_ordered_picklable() -> None:
    a = NodeId(bytes(31) + b"\x01")
    b = NodeId(bytes(31) + b"\x02")
    with pytest.raises(AttributeError):
        a._raw = bytes(32)
    assert {a, NodeId(a.raw)} == {a}
    assert a < b <= b
    assert b > a >= a
    assert sorted([b, a]) == [a, b]
    assert a != b
    assert a != a.raw
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == f"NodeId('{a}')"
    assert NodeId(bytearray(a.raw)) == NodeId(memoryview(a.raw)) == a


def test_public_key_round_trip() -> None:
    key_pair = KeyPair.generate()
    node_id = key_pair.node_id
    assert NodeId.from_public_key(node_id.public_key()) == node_id


# -- distance and buckets ------------------------------------------------------


@given(node_ids, node_ids, node_ids)
def test_xor_distance(a: NodeId, b: NodeId, c: NodeId) -> None:
    assert node_distance(a, b) == node_distance(b, a) == a.distance(b)
    assert (node_distance(a, b) == 0) == (a == b)
    assert node_distance(a, b) ^ node_distance(b, c) == node_distance(a, c)
    assert 0 <= node_distance(a, b) < 1 << 256


@given(node_ids, node_ids)
def test_bucket_index(a: NodeId, b: NodeId) -> None:
    if a == b:
        with pytest.raises(ValueError, match="itself"):
            bucket_index(a, b)
        return
    index = bucket_index(a, b)
    assert 0 <= index <= 255
    assert index == node_distance(a, b).bit_length() - 1
    assert index == bucket_index(b, a)
    assert 2**index <= node_distance(a, b) < 2 ** (index + 1)


def _polykey_bucket_index(a: bytes, b: bytes) -> int:
    # Polykey's algorithm: most significant differing byte, then its top bit.
    distance = bytes(x ^ y for x, y in zip(a, b, strict=True))
    for byte_index, byte in enumerate(distance):
        if byte:
            return (byte.bit_length() - 1) + (len(distance) - byte_index - 1) * 8
    raise AssertionError("equal ids")


def test_bucket_index_brute_force() -> None:
    base = NodeId(bytes(range(32)))
    for bit in range(256):
        other = NodeId.from_int(base.to_int() ^ (1 << bit))
        assert bucket_index(base, other) == bit
        # Lower bits never change the bucket.
        noisy = NodeId.from_int(other.to_int() ^ ((1 << bit) - 1))
        assert bucket_index(base, noisy) == bit
        assert bucket_index(base, noisy) == _polykey_bucket_index(base.raw, noisy.raw)
    assert bucket_index(NodeId(bytes(32)), NodeId(b"\x80" + bytes(31))) == 255
    assert bucket_index(NodeId(bytes(32)), NodeId(bytes(31) + b"\x01")) == 0


@given(raw_ids, raw_ids)
def test_bucket_index_matches_polykey_algorithm(a: bytes, b: bytes) -> None:
    if a != b:
        assert bucket_index(NodeId(a), NodeId(b)) == _polykey_bucket_index(a, b)
