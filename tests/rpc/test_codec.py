"""The streaming JSON decoder and the encoder (pure, no trio)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polykey.rpc import JSONStreamDecoder, RPCMessageLength, RPCParseError, encode_json
from polykey.rpc._codec import NEED_DATA

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
# Containers and strings delimit themselves; scalars need whitespace between.
self_delimiting = json_values.filter(lambda v: isinstance(v, dict | list | str))
whitespace = st.text(alphabet=" \t\r\n", max_size=3)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


def decode(chunks: list[bytes], limit: int = 1 << 20) -> list[Any]:
    decoder = JSONStreamDecoder(limit)
    out: list[Any] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.feed_eof())
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(self_delimiting, max_size=8), st.lists(st.integers(0, 10_000), max_size=12)
)
def test_back_to_back_values_split_anywhere(values: list[Any], cuts: list[int]) -> None:
    data = b"".join(encode_json(v) for v in values)
    assert decode(split(data, cuts)) == values


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(json_values, whitespace), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_values_with_whitespace_split_anywhere(
    items: list[tuple[Any, str]], cuts: list[int]
) -> None:
    # Scalars need a separator; give every value at least one space.
    data = b"".join(
        json.dumps(v, indent=None).encode() + b" " + ws.encode() for v, ws in items
    )
    assert decode(split(data, cuts)) == [v for v, _ in items]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=6))
def test_random_bytes_never_crash(data: bytes, cuts: list[int]) -> None:
    try:
        values = decode(split(data, cuts), limit=64)
    except (RPCParseError, RPCMessageLength):
        return
    # whatever decoded is JSON that re-encodes
    for v in values:
        json.dumps(v)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(self_delimiting, min_size=1, max_size=5), st.lists(st.integers(0, 10_000))
)
def test_limit_does_not_depend_on_chunking(values: list[Any], cuts: list[int]) -> None:
    data = b"".join(encode_json(v) for v in values)
    limit = max(1, max(len(encode_json(v)) for v in values) - 1)
    with pytest.raises(RPCMessageLength):
        decode(split(data, cuts), limit=limit)
    assert decode(split(data, cuts), limit=limit + 1) == values


def test_several_values_in_one_chunk_and_escapes() -> None:
    data = b'{"a":"}\\"{"}[1,[2,{"b":"\\\\"}]]"x\\u0041"\n\t true 1.5e3 null'
    assert decode([data]) == [
        {"a": '}"{'},
        [1, [2, {"b": "\\"}]],
        "xA",
        True,
        1500.0,
        None,
    ]


def test_byte_by_byte() -> None:
    msgs = [
        {"jsonrpc": "2.0", "method": "m", "params": {"s": 'q"\\}]'}, "id": None}
    ] * 3
    data = b"".join(encode_json(m) for m in msgs)
    assert decode([data[i : i + 1] for i in range(len(data))]) == msgs


def test_top_level_literal_waits_for_a_delimiter_or_eof() -> None:
    d = JSONStreamDecoder()
    assert d.feed(b"12") == []
    assert d.feed(b"3 ") == [123]
    assert d.feed(b"tr") == []
    with pytest.raises(RPCParseError):
        d.feed_eof()  # 'tr' is not a literal
    d = JSONStreamDecoder()
    assert d.feed(b"-4.5") == []
    assert d.feed_eof() == [-4.5]


def test_truncated_value_at_eof() -> None:
    d = JSONStreamDecoder()
    assert d.feed(b'{"a":[1,') == []
    with pytest.raises(RPCParseError):
        d.feed_eof()
    # poisoned from then on
    with pytest.raises(RPCParseError):
        d.next_value()


@pytest.mark.parametrize(
    "data",
    [
        b"}",
        b"]",
        b",",
        b":",
        b"{]",
        b"[}",
        b"{1:2}",
        b"NaN",
        b"[Infinity]",
        b"{'a':1}",
        b'"\xff"',
    ],
)
def test_invalid(data: bytes) -> None:
    with pytest.raises(RPCParseError):
        decode([data])


def test_limit_counts_bytes_since_last_value() -> None:
    d = JSONStreamDecoder(10)
    assert d.feed(b'{"a":1}' * 5) == [{"a": 1}] * 5  # each under the limit
    with pytest.raises(RPCMessageLength):
        d.feed(b" " * 11)  # whitespace counts
    d = JSONStreamDecoder(10)
    d.feed(b'{"a":"')
    with pytest.raises(RPCMessageLength):
        d.feed(b"12345")


def test_take_buffer_leaves_raw_bytes() -> None:
    d = JSONStreamDecoder()
    d.receive_data(b'{"result":{}}raw \x00\xff bytes')
    assert d.next_value() == {"result": {}}
    assert d.take_buffer() == b"raw \x00\xff bytes"


def test_encoder_is_compact_and_utf8() -> None:
    assert encode_json({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'.encode()
    assert encode_json("\ud800") == b'"\\ud800"'  # lone surrogate stays valid
    with pytest.raises(ValueError, match="JSON"):
        encode_json(float("nan"))


def test_bad_limit() -> None:
    with pytest.raises(ValueError, match="positive"):
        JSONStreamDecoder(0)


class _ScannerOnly(JSONStreamDecoder):
    """The decoder without its fast path (every value through the scanner)."""

    __slots__ = ()

    def _fast_value(self, pos: int) -> Any:
        return NEED_DATA


def _outcome(
    cls: type[JSONStreamDecoder], chunks: list[bytes], limit: int
) -> list[Any]:
    """The values ``chunks`` decode to, then the error (type and text) if any."""
    decoder = cls(limit)
    out: list[Any] = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
        out.extend(decoder.feed_eof())
    except (RPCParseError, RPCMessageLength) as exc:
        out.append((type(exc).__name__, str(exc)))
    return out


# JSON-like text from the pieces where a scanner might differ: constants
# JSON refuses, escapes, non-ASCII, numbers, nesting, truncation.
_pieces = st.sampled_from(
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\n",
        '"a"',
        '"\\ud800"',
        '"\\u00e9"',
        '"é"',
        "1",
        "-0",
        "1e400",
        "0.5",
        "true",
        "null",
        "NaN",
        "Infinity",
        '"',
    ]
)
_json_like = st.lists(_pieces, max_size=30).map(lambda p: "".join(p).encode())


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        _json_like,
        st.lists(json_values, max_size=4).map(
            lambda vs: b" ".join(encode_json(v) for v in vs)
        ),
        st.binary(max_size=100),
    ),
    st.lists(st.integers(0, 300), max_size=4),
    st.sampled_from([16, 1 << 20]),
)
def test_fast_path_decodes_as_the_scanner_does(
    data: bytes, cuts: list[int], limit: int
) -> None:
    chunks = split(data, cuts)
    assert _outcome(JSONStreamDecoder, chunks, limit) == _outcome(
        _ScannerOnly, chunks, limit
    )
