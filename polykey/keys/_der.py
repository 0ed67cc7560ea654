"""A minimal DER reader/writer: just enough to edit one X.509 extension.

Polykey's node signature covers the TBSCertificate *without* the node
signature extension. A verifier re-creates those bytes by removing that one
Extension from the final TBSCertificate and re-encoding the three enclosing
lengths (Extensions SEQUENCE, the ``[3]`` wrapper, the TBSCertificate
SEQUENCE). Every other element is copied byte for byte, so the result is the
DER of the filtered structure, which is what Polykey's asn1-schema
re-serialisation produces too.

Only the subset X.509 uses is accepted: low tag numbers and definite,
minimally encoded lengths. Anything else raises :class:`DERError`.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "TLV",
    "DERError",
    "encode_length",
    "encode_tlv",
    "oid_content",
    "read_children",
    "read_tlv",
    "remove_extension",
]

TAG_OCTET_STRING: Final = 0x04
TAG_OID: Final = 0x06
TAG_IA5_STRING: Final = 0x16
TAG_SEQUENCE: Final = 0x30
TAG_EXTENSIONS: Final = 0xA3  # [3] EXPLICIT, constructed


class DERError(ValueError):
    """Malformed or unsupported DER."""


class TLV(NamedTuple):
    tag: int
    start: int  # offset of the tag byte
    content_start: int
    end: int  # offset just past the content

    def content(self, data: bytes) -> bytes:
        return data[self.content_start : self.end]

    def whole(self, data: bytes) -> bytes:
        return data[self.start : self.end]


def read_tlv(data: bytes, offset: int = 0, limit: int | None = None) -> TLV:
    """Read one TLV at ``offset`` that must end at or before ``limit``."""
    if limit is None:
        limit = len(data)
    if offset + 2 > limit:
        raise DERError("truncated DER header")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DERError("high tag numbers are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DERError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4:
            raise DERError("DER length too large")
        if pos + count > limit:
            raise DERError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise DERError("non-minimal DER length")
        pos += count
    end = pos + length
    if end > limit:
        raise DERError("DER content runs past its container")
    return TLV(tag, offset, pos, end)


def read_children(data: bytes, parent: TLV) -> list[TLV]:
    """The TLVs that exactly fill ``parent``'s content."""
    children = []
    offset = parent.content_start
    while offset < parent.end:
        child = read_tlv(data, offset, parent.end)
        children.append(child)
        offset = child.end
    return children


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    size = (length.bit_length() + 7) // 8
    return bytes([0x80 | size]) + length.to_bytes(size, "big")


def encode_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(content)) + content


def oid_content(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"invalid OID {dotted!r}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def remove_extension(tbs: bytes, oid: str) -> bytes | None:
    """Re-encode a TBSCertificate without the extension(s) with ``oid``.

    Returns None if there is no such extension. An Extensions SEQUENCE left
    empty is kept (empty), as asn1-schema would serialise it.
    """
    top = read_tlv(tbs)
    if top.tag != TAG_SEQUENCE or top.end != len(tbs):
        raise DERError("TBSCertificate is not a single SEQUENCE")
    children = read_children(tbs, top)
    wanted = oid_content(oid)
    for index, child in enumerate(children):
        if child.tag != TAG_EXTENSIONS:
            continue
        (extensions,) = _single_child(tbs, child)
        if extensions.tag != TAG_SEQUENCE:
            raise DERError("Extensions is not a SEQUENCE")
        kept: list[bytes] = []
        removed = False
        for extension in read_children(tbs, extensions):
            fields = (
                read_children(tbs, extension) if extension.tag == TAG_SEQUENCE else []
            )
            if not fields or fields[0].tag != TAG_OID:
                raise DERError("Extension does not start with an OID")
            if fields[0].content(tbs) == wanted:
                removed = True
            else:
                kept.append(extension.whole(tbs))
        if not removed:
            return None
        wrapper = encode_tlv(TAG_EXTENSIONS, encode_tlv(TAG_SEQUENCE, b"".join(kept)))
        body = b"".join(
            wrapper if i == index else c.whole(tbs) for i, c in enumerate(children)
        )
        return encode_tlv(TAG_SEQUENCE, body)
    return None


def _single_child(data: bytes, parent: TLV) -> tuple[TLV]:
    children = read_children(data, parent)
    if len(children) != 1:
        raise DERError("explicit tag must wrap exactly one element")
    return (children[0],)
