"""The nodes layer's wire shapes (polykey/nodes/_wire.py): cattrs structures
what peers send and unstructures what we send, with our own error words."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polykey.keys import NodeId
from polykey.nodes import (
    ActiveConnection,
    InvalidAddressError,
    NodeAddress,
    NodeContact,
    encode_node_contact,
    parse_active_connection_message,
    parse_node_contact_message,
)
from polykey.nodes._messages import (
    encode_active_connections,
    encode_node_contact_structured,
)
from polykey.nodes._wire import (
    CircuitId,
    ConnectionInfo,
    ContactInfo,
    Count,
    Millis,
    NodeIdParams,
    PacketSize,
    PingAnswer,
    RelayConnectAnswer,
    RelayConnectParams,
    RelayReserveAnswer,
    RelayStopParams,
    SignalFinalParams,
    SignalInitialParams,
    Signature,
    WireError,
    b64url_encode,
    converter,
    structure,
)

A = NodeId.from_int(1 << 200)
B = NodeId.from_int(7)
SIG = b64url_encode(bytes(range(64)))

node_ids = st.integers(min_value=0, max_value=(1 << 256) - 1).map(NodeId.from_int)
addresses = st.builds(
    NodeAddress,
    st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255),
              st.integers(1, 254)).map(lambda t: ".".join(map(str, t))),
    st.integers(1, 65535),
)  # fmt: skip


@given(node_ids, st.lists(addresses, min_size=1, max_size=5, unique=True),
       st.one_of(st.none(), st.floats(0, 2e9)))  # fmt: skip
def test_node_contact_round_trips(
    node_id: NodeId, addrs: list[NodeAddress], seen: float | None
) -> None:
    contact = NodeContact(node_id, addrs)
    message = encode_node_contact(contact, seen)
    assert set(message) == {"nodeIdEncoded", "nodeContact"}
    entries = message["nodeContact"]
    assert isinstance(entries, dict)
    for entry in entries.values():
        assert entry["mode"] == "direct"
        assert entry["scopes"] == ["global"]
        assert isinstance(entry["connectedTime"], int)
    assert parse_node_contact_message(message) == contact


def _v6(ip: object) -> NodeAddress | None:
    try:
        return NodeAddress(str(ip), 1314)
    except InvalidAddressError:
        return None  # multicast, unspecified: not node addresses


more_addresses = st.one_of(
    addresses,
    st.ip_addresses(v=6).map(_v6).filter(lambda a: a is not None),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]\.example", fullmatch=True).map(
        lambda name: NodeAddress(name, 443)
    ),
)
connected_times = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 2**40)
)


@given(node_ids, st.lists(more_addresses, max_size=5, unique=True), connected_times)
def test_the_written_out_contact_encoding_is_the_cattrs_one(
    node_id: NodeId, addrs: list[NodeAddress | None], seen: float | None
) -> None:
    """encode_node_contact is written out for speed: the same JSON as the
    attrs shapes through cattrs, key order included."""
    contact = NodeContact(node_id, [a for a in addrs if a is not None])
    fast = encode_node_contact(contact, seen)
    assert fast == encode_node_contact_structured(contact, seen)
    assert json.dumps(fast) == json.dumps(encode_node_contact_structured(contact, seen))


@given(node_ids, st.lists(addresses, min_size=1, max_size=5, unique=True))
def test_active_connections_round_trip(
    node_id: NodeId, addrs: list[NodeAddress]
) -> None:
    conns = [ActiveConnection(node_id, a, f"c{i}") for i, a in enumerate(addrs)]
    message = encode_active_connections(node_id, conns)
    assert parse_active_connection_message(message) == NodeContact(node_id, addrs)


def test_python_names_become_polykey_keys() -> None:
    assert converter.unstructure(NodeIdParams(A)) == {"nodeIdEncoded": str(A)}
    assert converter.unstructure(ContactInfo(connected_time=5)) == {
        "mode": "direct",
        "connectedTime": 5,
        "scopes": ["global"],
    }
    info = ConnectionInfo("10.0.0.1", 1, host_name="h", timeout=None)
    assert converter.unstructure(info) == {
        "host": "10.0.0.1",
        "port": 1,
        "hostName": "h",
        "timeout": None,
        "primary": True,
    }
    params = SignalInitialParams(B, Signature(bytes(range(64))))
    assert converter.unstructure(params) == {
        "targetNodeIdEncoded": str(B),
        "signature": SIG,
    }
    assert structure(converter.unstructure(params), SignalInitialParams) == params


@pytest.mark.parametrize(
    ("value", "cls", "message"),
    [
        ([], NodeIdParams, "params must be an object"),
        ({}, NodeIdParams, "nodeIdEncoded is missing"),
        ({"nodeIdEncoded": 5}, NodeIdParams, "nodeIdEncoded must be an encoded NodeId"),
        ({"host": "h", "port": True}, ConnectionInfo, "port must be an integer"),
        ({"host": "h", "port": "1"}, ConnectionInfo, "port must be an integer"),
        ({"host": "h", "port": 1, "primary": 1}, ConnectionInfo, "primary must be true or false"),
        ({"host": "h", "port": 1, "hostName": 3}, ConnectionInfo, "hostName must be a string"),
        ({"scopes": "global"}, ContactInfo, "scopes must be a list of strings"),
        ({"targetNodeIdEncoded": str(B), "signature": "abc"}, SignalInitialParams,
         "signature must be a 64-byte signature"),
        ({"targetNodeIdEncoded": str(B), "signature": "!" * 86}, SignalInitialParams,
         "signature must be a base64url signature"),
        ({"targetNodeIdEncoded": str(B), "signature": "A" * 4000}, SignalInitialParams,
         "signature must be a base64url signature"),
        ({"sourceNodeIdEncoded": str(A), "targetNodeIdEncoded": str(B),
          "address": "1.2.3.4:5", "requestSignature": SIG, "relaySignature": SIG},
         SignalFinalParams, "address must be an object"),
        ({"targetNodeIdEncoded": "vnope"}, RelayConnectParams,
         "targetNodeIdEncoded must be an encoded NodeId"),
        ({"sourceNodeIdEncoded": str(A), "circuit": "xx"}, RelayStopParams,
         "circuit must be 8 bytes"),
        ({"sourceNodeIdEncoded": str(A), "circuit": "!!!!!!!!!!!"}, RelayStopParams,
         "circuit must be base64url"),
        ({"circuit": "AAAAAAAAAAA"}, RelayStopParams, "sourceNodeIdEncoded is missing"),
        # The first bad key in the shape's order is the one named.
        ({"sourceNodeIdEncoded": "x", "targetNodeIdEncoded": 1}, SignalFinalParams,
         "sourceNodeIdEncoded must be an encoded NodeId"),
    ],
)  # fmt: skip
def test_errors_name_the_key_in_our_words(
    value: object, cls: type, message: str
) -> None:
    with pytest.raises(WireError) as info:
        structure(value, cls)
    assert str(info.value) == message


def test_relay_params_round_trip_and_errors_name_their_key() -> None:
    stop = RelayStopParams(A, CircuitId(bytes(range(8))))
    wire = converter.unstructure(stop)
    assert wire == {"sourceNodeIdEncoded": str(A), "circuit": "AAECAwQFBgc"}
    assert structure(wire, RelayStopParams) == stop
    connect = RelayConnectParams(B)
    assert converter.unstructure(connect) == {"targetNodeIdEncoded": str(B)}
    assert structure(converter.unstructure(connect), RelayConnectParams) == connect
    # The relay's handler tells a bad circuit (its own kind of malformed)
    # from other bad params by the key.
    with pytest.raises(WireError) as info:
        structure({"sourceNodeIdEncoded": str(A), "circuit": 5}, RelayStopParams)
    assert info.value.key == "circuit"
    with pytest.raises(WireError) as info:
        structure({"sourceNodeIdEncoded": 5, "circuit": "AAECAwQFBgc"}, RelayStopParams)
    assert info.value.key == "sourceNodeIdEncoded"
    with pytest.raises(WireError) as info:
        structure([], RelayStopParams)
    assert info.value.key is None


def test_the_relays_answers_round_trip_in_the_order_it_wrote_them() -> None:
    connect = RelayConnectAnswer(
        CircuitId(bytes(range(8))), Millis(600_000), Count(64 << 20), PacketSize(1302)
    )
    wire = converter.unstructure(connect)
    assert list(wire.items()) == [
        ("circuit", CIRCUIT),
        ("durationMs", 600_000),
        ("bytes", 64 << 20),
        ("maxPacket", 1302),
    ]
    assert structure(wire, RelayConnectAnswer) == connect
    # No maxPacket named: left out, not null.
    bare = attrs.evolve(connect, max_packet=None)
    assert "maxPacket" not in converter.unstructure(bare)
    reserve = RelayReserveAnswer(Millis(3_600_000))
    assert converter.unstructure(reserve) == {"expiresMs": 3_600_000}
    assert structure(converter.unstructure(reserve), RelayReserveAnswer) == reserve


def test_signal_address_keeps_the_senders_key_order() -> None:
    # The relay signature covers the address's JSON as the signaller wrote it.
    params = {
        "sourceNodeIdEncoded": str(A),
        "targetNodeIdEncoded": str(B),
        "address": {"port": 1, "host": "10.0.0.1"},
        "requestSignature": SIG,
        "relaySignature": SIG,
    }
    final = structure(params, SignalFinalParams)
    assert list(final.address) == ["port", "host"]
    assert converter.unstructure(final) == params


HUGE = 10**400  # a JSON integer no float holds
CIRCUIT = "AAECAwQFBgc"


@pytest.mark.parametrize(
    ("value", "cls", "message"),
    [
        # Answers named "answer": every key is a path from it.
        ([], NodeAddress, "answer must be an object"),
        ({"host": "10.0.0.1"}, NodeAddress, "answer.port is missing"),
        ({"port": 1}, NodeAddress, "answer.host is missing"),
        ({"host": 5, "port": 1}, NodeAddress, "answer.host must be a string"),
        ({"host": {"host": "10.0.0.1"}, "port": 1}, NodeAddress,
         "answer.host must be a string"),
        ({"host": "10.0.0.1", "port": "1"}, NodeAddress,
         "answer.port must be a port number (1-65535)"),
        ({"host": "10.0.0.1", "port": True}, NodeAddress,
         "answer.port must be a port number (1-65535)"),
        ({"host": "10.0.0.1", "port": 0}, NodeAddress,
         "answer.port must be a port number (1-65535)"),
        ({"host": "10.0.0.1", "port": HUGE}, NodeAddress,
         "answer.port must be a port number (1-65535)"),
        ({"host": "10.0.0.1", "port": 1.5}, NodeAddress,
         "answer.port must be a port number (1-65535)"),
        ({"host": "0.0.0.0", "port": 1}, NodeAddress,
         "answer.host is not dialable: '0.0.0.0' is not a unicast address"),
        ({"host": "fe80::1%eth0", "port": 1}, NodeAddress,
         "answer.host is not dialable: scoped IPv6 address 'fe80::1%eth0' is not usable"),
        ({"address": "10.0.0.1:1"}, PingAnswer, "answer.address must be an object"),
        ({"address": [["10.0.0.1", 1]]}, PingAnswer, "answer.address must be an object"),
        ({"address": {"host": "10.0.0.1", "port": HUGE}}, PingAnswer,
         "answer.address.port must be a port number (1-65535)"),
        ({"address": {"host": "10.0.0.1", "port": {"port": 1}}}, PingAnswer,
         "answer.address.port must be a port number (1-65535)"),
        ({"address": {"port": 1}}, PingAnswer, "answer.address.host is missing"),
        ({}, RelayReserveAnswer, "answer.expiresMs is missing"),
        ({"expiresMs": "60000"}, RelayReserveAnswer,
         "answer.expiresMs must be a positive integer of at most 2**53 - 1"),
        ({"expiresMs": 0}, RelayReserveAnswer,
         "answer.expiresMs must be a positive integer of at most 2**53 - 1"),
        ({"expiresMs": HUGE}, RelayReserveAnswer,
         "answer.expiresMs must be a positive integer of at most 2**53 - 1"),
        ({"expiresMs": [60000]}, RelayReserveAnswer,
         "answer.expiresMs must be a positive integer of at most 2**53 - 1"),
        ({}, RelayConnectAnswer, "answer.circuit is missing"),
        ({"circuit": "!" * 11}, RelayConnectAnswer, "answer.circuit must be base64url"),
        ({"circuit": "A" * 4000}, RelayConnectAnswer, "answer.circuit must be base64url"),
        ({"circuit": [CIRCUIT]}, RelayConnectAnswer, "answer.circuit must be base64url"),
        ({"circuit": "AAAA"}, RelayConnectAnswer, "answer.circuit must be 8 bytes"),
        ({"circuit": CIRCUIT, "maxPacket": "1400"}, RelayConnectAnswer,
         "answer.maxPacket must be a packet size (1-65535)"),
        ({"circuit": CIRCUIT, "maxPacket": HUGE}, RelayConnectAnswer,
         "answer.maxPacket must be a packet size (1-65535)"),
        ({"circuit": CIRCUIT, "durationMs": "600000"}, RelayConnectAnswer,
         "answer.durationMs must be a positive integer of at most 2**53 - 1"),
        ({"circuit": CIRCUIT, "bytes": -1}, RelayConnectAnswer,
         "answer.bytes must be an integer from 0 to 2**53 - 1"),
    ],
)  # fmt: skip
def test_answers_name_the_path_to_the_bad_key(
    value: object, cls: type, message: str
) -> None:
    with pytest.raises(WireError) as info:
        structure(value, cls, at="answer")
    assert str(info.value) == message
    assert info.value.key == message.split(" ")[0]


def test_answers_structure_to_what_the_callers_use() -> None:
    assert structure({"host": "::ffff:10.0.0.1", "port": 1, "x": 1}, NodeAddress) == (
        NodeAddress("10.0.0.1", 1)
    )
    assert structure({"success": True}, PingAnswer) == PingAnswer(None)
    assert structure(
        {"address": {"host": "10.0.0.1", "port": 9}}, PingAnswer
    ) == PingAnswer(NodeAddress("10.0.0.1", 9))
    assert structure({"expiresMs": 2**53 - 1}, RelayReserveAnswer).expires_ms == (
        2**53 - 1
    )
    assert structure({"circuit": CIRCUIT, "maxPacket": 1400}, RelayConnectAnswer) == (
        RelayConnectAnswer(CircuitId(bytes(range(8))), max_packet=PacketSize(1400))
    )
    assert converter.unstructure(NodeAddress("10.0.0.1", 9)) == {
        "host": "10.0.0.1",
        "port": 9,
    }


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_any_json_is_a_contact_or_none_never_an_exception(value: object) -> None:
    for candidate in (value, {"nodeIdEncoded": str(A), "nodeContact": value},
                      {"nodeId": str(A), "connections": value}):  # fmt: skip
        contact = parse_node_contact_message(candidate)
        assert contact is None or isinstance(contact, NodeContact)
        result = parse_active_connection_message(candidate)
        assert result is None or isinstance(result, NodeContact)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, json_values)
def test_any_json_is_an_answer_or_a_wire_error_naming_a_key(
    value: object, inner: object
) -> None:
    shapes: list[tuple[object, type]] = [
        (value, NodeAddress),
        ({"host": value, "port": inner}, NodeAddress),
        ({"address": value}, PingAnswer),
        ({"address": {"host": "10.0.0.1", "port": value}}, PingAnswer),
        ({"expiresMs": value}, RelayReserveAnswer),
        ({"circuit": value, "maxPacket": inner}, RelayConnectAnswer),
    ]
    for candidate, cls in shapes:
        # Anything but a WireError (cattrs', Python's) fails the test.
        error: WireError | None = None
        try:
            structure(candidate, cls, at="answer")
        except WireError as exc:
            error = exc
        if error is not None:
            assert error.key is not None
            assert str(error).startswith(error.key + " ")
