"""Node addresses: what can be dialled, in canonical form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polykey.keys import NodeId
from polykey.nodes import (
    MAX_ADDRESSES,
    InvalidAddressError,
    NodeAddress,
    NodeContact,
    format_contact_address,
    parse_address,
    parse_contact_address,
)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 1314, ("127.0.0.1", 1314)),
        ("::1", 1, ("::1", 1)),
        ("2001:DB8::0001", 65535, ("2001:db8::1", 65535)),
        ("::ffff:10.0.0.1", 80, ("10.0.0.1", 80)),
        ("Seed.Polykey.IO.", 1314, ("seed.polykey.io", 1314)),
        ("localhost", 1314, ("localhost", 1314)),
    ],
)
def test_valid_addresses_are_canonical(
    host: str, port: int, expected: tuple[str, int]
) -> None:
    assert parse_address(host, port).as_tuple() == expected


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("127.0.0.1", 0),
        ("127.0.0.1", 65536),
        ("127.0.0.1", -1),
        ("127.0.0.1", True),
        ("127.0.0.1", "1314"),
        ("fe80::1%eth0", 1314),
        ("fe80::1%1", 1314),
        ("0.0.0.0", 1314),
        ("::", 1314),
        ("224.0.0.1", 1314),
        ("ff02::1", 1314),
        ("255.255.255.255", 1314),
        ("", 1314),
        ("-bad.example", 1314),
        ("bad_host", 1314),
        ("a" * 64 + ".example", 1314),
        ("x." * 130 + "io", 1314),
        ("1.2.3", 1314),
        ("[::1]", 1314),
        ("host name", 1314),
        (None, 1314),
        (b"127.0.0.1", 1314),
    ],
)
def test_bogus_addresses_are_refused(host: object, port: object) -> None:
    with pytest.raises(InvalidAddressError):
        parse_address(host, port)


def test_contact_address_round_trip() -> None:
    for address in [NodeAddress("10.0.0.1", 1314), NodeAddress("::1", 7)]:
        assert parse_contact_address(format_contact_address(address)) == address
    # Polykey's own form (its agent sends "127.0.0.1-47254").
    assert format_contact_address(NodeAddress("::1", 7)) == "::1-7"
    assert format_contact_address(NodeAddress("10.0.0.1", 1314)) == "10.0.0.1-1314"
    assert parse_contact_address("my-host.example-1314") == NodeAddress(
        "my-host.example", 1314
    )


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1",
        "10.0.0.1-",
        "-1314",
        "10.0.0.1:1314",
        "[::1]-7",
        "fe80::1%eth0-1",
        "10.0.0.1-0",
        "10.0.0.1-99999",
        "10.0.0.1-+80",
        "10.0.0.1-\uff18\uff10",  # full-width digits
        42,
        None,
    ],
)
def test_bogus_contact_addresses(text: object) -> None:
    with pytest.raises(InvalidAddressError):
        parse_contact_address(text)


@given(st.text(max_size=300))
def test_parse_contact_address_never_crashes(text: str) -> None:
    try:
        address = parse_contact_address(text)
    except InvalidAddressError:
        return
    assert parse_contact_address(format_contact_address(address)) == address


def test_contact_keeps_five_unique_addresses() -> None:
    nid = NodeId(bytes(32))
    addresses = [NodeAddress("10.0.0.1", p) for p in (1, 1, 2, 3, 4, 5, 6, 7)]
    contact = NodeContact(nid, addresses)
    assert [a.port for a in contact.addresses] == [1, 2, 3, 4, 5]
    assert len(contact.addresses) == MAX_ADDRESSES
    with pytest.raises(TypeError):
        NodeContact(nid, [("10.0.0.1", 1)])  # type: ignore[list-item]


_octet = st.one_of(
    st.integers(0, 999).map(str),
    st.integers(0, 255).map(lambda n: f"0{n}"),
    st.sampled_from(["", "-1", "+1", " 1", "1 ", "\u0661", "\uff11", "0x1", "1e2"]),
)
_dotted = st.one_of(
    st.lists(_octet, min_size=3, max_size=5).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.text(alphabet="0123456789.", max_size=20),
)


@given(_dotted)
def test_plain_ipv4_shortcut_answers_as_ipaddress_does(host: str) -> None:
    # The shortcut may decline (None) anything; what it answers must be what
    # the slow path answers, and the slow path must accept that host.
    from polykey.nodes._address import _canonical_slow, _plain_ipv4

    quad = _plain_ipv4(host)
    if quad is not None:
        assert quad == _canonical_slow(host)


@pytest.mark.parametrize(
    "host", ["1.2.3.4", "10.0.0.1", "127.0.0.1", "223.255.255.255", "192.168.1.20"]
)
def test_plain_ipv4_shortcut_takes_ordinary_addresses(host: str) -> None:
    from polykey.nodes._address import _plain_ipv4

    assert _plain_ipv4(host) == host


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "0.1.2.3", "224.0.0.1", "255.255.255.255", "01.2.3.4", "1.2.3", "::1"],
)
def test_plain_ipv4_shortcut_leaves_the_rest_to_ipaddress(host: str) -> None:
    from polykey.nodes._address import _plain_ipv4

    assert _plain_ipv4(host) is None
