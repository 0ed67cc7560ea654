"""NodeId: a node's identity, which is its raw 32-byte Ed25519 public key.

Polykey writes a NodeId as a multibase string: the prefix ``v`` (base32hex,
RFC 4648 section 7, lowercase, unpadded) followed by 52 characters. 256 bits
do not divide into 5-bit characters, so the last character carries one data
bit and four zero bits; like js-multiformats we reject non-zero pad bits, so
every NodeId has exactly one string form and ``from_string`` is the exact
inverse of ``encode``.

Polykey's decoder (``IdInternal.fromMultibase``) also accepts any other
multibase encoding of the same 32 bytes; we accept only the canonical form
Polykey itself writes.
"""

from __future__ import annotations

import base64
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._errors import NodeIdError

__all__ = [
    "NODE_ID_BITS",
    "NODE_ID_LENGTH",
    "NODE_ID_STRING_LENGTH",
    "NodeId",
    "b32hex_decode",
    "b32hex_encode",
    "bucket_index",
    "node_distance",
]

NODE_ID_LENGTH: Final = 32
NODE_ID_BITS: Final = NODE_ID_LENGTH * 8
MULTIBASE_BASE32HEX: Final = "v"
# 1 prefix character + ceil(256 / 5) data characters.
NODE_ID_STRING_LENGTH: Final = 1 + -(-NODE_ID_BITS // 5)

_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuv"
_CHARS: Final = frozenset(_ALPHABET)


def b32hex_encode(data: bytes) -> str:
    """Base32hex (RFC 4648), lowercase, without padding."""
    return base64.b32hexencode(data).decode("ascii").rstrip("=").lower()


def b32hex_decode(text: str) -> bytes:
    """Strict inverse of :func:`b32hex_encode`.

    Raises ValueError on padding, upper case, characters outside the
    alphabet, an impossible length, or non-zero pad bits.
    """
    if not _CHARS.issuperset(text):
        for position, char in enumerate(text):
            if char not in _CHARS:
                raise ValueError(
                    f"invalid base32hex character {char!r} at position {position}"
                )
    bits = 5 * len(text)
    nbytes, spare = divmod(bits, 8)
    # A valid encoding never leaves a whole character's worth of spare bits.
    if spare >= 5:
        raise ValueError(f"impossible base32hex length {len(text)}")
    # The alphabet is exactly int()'s base-32 digits; what int() would also
    # take (upper case, signs, "_", spaces) the check above has refused.
    # About 20 times faster than a loop over the characters in Python.
    acc = int(text, 32) if text else 0
    if acc & ((1 << spare) - 1):
        raise ValueError("non-canonical base32hex: trailing pad bits are not zero")
    return (acc >> spare).to_bytes(nbytes, "big")


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class NodeId:
    """An immutable 32-byte node identifier.

    Equality, hashing and ordering follow the raw bytes (big-endian, so the
    order is also that of the ids read as 256-bit integers). ``str()`` gives
    Polykey's encoded form; ``bytes()`` the raw bytes.
    """

    __slots__ = ("_raw", "_text")
    _raw: bytes
    #: The encoded form, made on first use: a node encodes the same ids
    #: again and again (every lookup answer names 20 of them).
    _text: str | None

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise TypeError(f"NodeId needs bytes, not {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) != NODE_ID_LENGTH:
            raise NodeIdError(f"NodeId must be {NODE_ID_LENGTH} bytes, got {len(raw)}")
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_text", None)

    @classmethod
    def from_string(cls, text: str) -> NodeId:
        """Parse Polykey's encoded form (``v`` + 52 base32hex characters)."""
        if not isinstance(text, str):
            raise TypeError(f"NodeId.from_string needs str, not {type(text).__name__}")
        if not text:
            raise NodeIdError("empty string is not a NodeId")
        if text[0] != MULTIBASE_BASE32HEX:
            hint = " (upper-case base32hex is not accepted)" if text[0] == "V" else ""
            raise NodeIdError(
                f"NodeId must start with multibase prefix 'v' (base32hex), "
                f"got {text[0]!r}{hint}"
            )
        if len(text) != NODE_ID_STRING_LENGTH:
            raise NodeIdError(
                f"encoded NodeId must be {NODE_ID_STRING_LENGTH} characters, "
                f"got {len(text)}: {_shorten(text)}"
            )
        try:
            raw = b32hex_decode(text[1:])
        except ValueError as exc:
            raise NodeIdError(f"malformed NodeId {_shorten(text)}: {exc}") from None
        node_id = cls(raw)
        # The decoding is strict, so ``text`` is the canonical encoding.
        object.__setattr__(node_id, "_text", text)
        return node_id

    @classmethod
    def from_public_key(cls, key: Ed25519PublicKey) -> NodeId:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"a NodeId is an Ed25519 key, not {type(key).__name__}")
        return cls(key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def from_int(cls, value: int) -> NodeId:
        if not 0 <= value < 1 << NODE_ID_BITS:
            raise NodeIdError("integer out of range for a NodeId")
        return cls(value.to_bytes(NODE_ID_LENGTH, "big"))

    @property
    def raw(self) -> bytes:
        return self._raw

    def encode(self) -> str:
        """Polykey's string form: ``v`` + lowercase unpadded base32hex."""
        text = self._text
        if text is None:
            text = MULTIBASE_BASE32HEX + b32hex_encode(self._raw)
            object.__setattr__(self, "_text", text)
        return text

    def to_int(self) -> int:
        return int.from_bytes(self._raw, "big")

    def public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key this NodeId is.

        Raises NodeIdError if the bytes are not a valid curve point (random
        ids, such as lookup targets, need not be).
        """
        try:
            return Ed25519PublicKey.from_public_bytes(self._raw)
        except ValueError:
            raise NodeIdError(
                f"NodeId {self} is not a valid Ed25519 public key"
            ) from None

    def distance(self, other: NodeId) -> int:
        """Kademlia XOR distance to ``other``."""
        return node_distance(self, other)

    def __bytes__(self) -> bytes:
        return self._raw

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"NodeId({self.encode()!r})"

    def __hash__(self) -> int:
        return hash(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NodeId):
            return self._raw == other._raw
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, NodeId):
            return self._raw != other._raw
        return NotImplemented

    def __lt__(self, other: NodeId) -> bool:
        if isinstance(other, NodeId):
            return self._raw < other._raw
        return NotImplemented

    def __le__(self, other: NodeId) -> bool:
        if isinstance(other, NodeId):
            return self._raw <= other._raw
        return NotImplemented

    def __gt__(self, other: NodeId) -> bool:
        if isinstance(other, NodeId):
            return self._raw > other._raw
        return NotImplemented

    def __ge__(self, other: NodeId) -> bool:
        if isinstance(other, NodeId):
            return self._raw >= other._raw
        return NotImplemented

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("NodeId is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("NodeId is immutable")

    def __reduce__(self) -> tuple[type[NodeId], tuple[bytes]]:
        return (NodeId, (self._raw,))


def node_distance(a: NodeId, b: NodeId) -> int:
    """XOR distance between two NodeIds, as a non-negative int."""
    return int.from_bytes(a.raw, "big") ^ int.from_bytes(b.raw, "big")


def bucket_index(self_id: NodeId, other_id: NodeId) -> int:
    """Index of the k-bucket ``other_id`` falls in, seen from ``self_id``.

    The position of the highest set bit of the XOR distance: 0 is the
    closest bucket (ids differing only in the last bit), 255 the farthest
    (ids differing in the first bit), as in Polykey's ``bucketIndex``.
    """
    distance = node_distance(self_id, other_id)
    if distance == 0:
        raise ValueError("a NodeId has no bucket index relative to itself")
    return distance.bit_length() - 1
