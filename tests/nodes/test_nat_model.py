"""The NAT models of polykey.testing (pure: no trio)."""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from polykey.quic import Address
from polykey.testing import Filtering, Mapping, Nat, NatBehaviour, NatType

HOST: Address = ("10.0.0.2", 1314)
OTHER_HOST: Address = ("10.0.0.3", 1314)
SEED: Address = ("203.0.113.2", 1314)
PEER: Address = ("198.51.100.7", 1314)
PEER_OTHER_PORT: Address = ("198.51.100.7", 4000)
STRANGER: Address = ("192.0.2.9", 1314)


def nat(kind: NatType | NatBehaviour, seed: int = 0) -> Nat:
    return Nat(kind, "203.0.113.11", rng=random.Random(seed))


def test_the_lab_types() -> None:
    assert NatBehaviour.of(NatType.FULL_CONE) == NatBehaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT
    )
    assert NatBehaviour.of(NatType.PORT_RESTRICTED) == NatBehaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT
    )
    assert NatBehaviour.of(NatType.SYMMETRIC) == NatBehaviour(
        Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT
    )
    with pytest.raises(ValueError, match="no NAT"):
        NatBehaviour.of(NatType.NONE)
    with pytest.raises(ValueError, match="no NAT"):
        Nat(NatType.NONE, "203.0.113.11")


def test_full_cone_lets_anyone_in_once_mapped() -> None:
    n = nat(NatType.FULL_CONE)
    assert n.inbound(STRANGER, 1314, 0.0) is None  # nothing mapped yet
    assert n.outbound(HOST, SEED, 0.0) == ("203.0.113.11", 1314)  # port kept
    assert n.outbound(HOST, PEER, 1.0) == ("203.0.113.11", 1314)
    assert n.inbound(STRANGER, 1314, 2.0) == HOST
    assert n.inbound(STRANGER, 1315, 2.0) is None
    assert n.statistics.unmapped == 2


def test_port_restricted_keeps_one_port_and_filters_by_endpoint() -> None:
    n = nat(NatType.PORT_RESTRICTED)
    out = n.outbound(HOST, SEED, 0.0)
    assert n.outbound(HOST, PEER, 0.0) == out
    assert n.inbound(SEED, out[1], 1.0) == HOST
    assert n.inbound(PEER, out[1], 1.0) == HOST
    assert n.inbound(PEER_OTHER_PORT, out[1], 1.0) is None  # same IP, other port
    assert n.inbound(STRANGER, out[1], 1.0) is None
    assert n.statistics.filtered == 2
    # A second host wanting the same port gets another one.
    assert n.outbound(OTHER_HOST, SEED, 0.0)[1] != out[1]


def test_restricted_cone_filters_by_address_only() -> None:
    n = nat(NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT))
    out = n.outbound(HOST, PEER, 0.0)
    assert n.inbound(PEER_OTHER_PORT, out[1], 1.0) == HOST
    assert n.inbound(STRANGER, out[1], 1.0) is None


def test_symmetric_maps_each_destination_to_a_new_random_port() -> None:
    n = nat(NatType.SYMMETRIC, seed=5)
    to_seed = n.outbound(HOST, SEED, 0.0)
    to_peer = n.outbound(HOST, PEER, 0.0)
    to_peer_port = n.outbound(HOST, PEER_OTHER_PORT, 0.0)
    assert len({to_seed, to_peer, to_peer_port}) == 3
    assert n.outbound(HOST, PEER, 1.0) == to_peer  # the same flow keeps its port
    assert n.inbound(PEER, to_peer[1], 1.0) == HOST
    assert n.inbound(PEER, to_seed[1], 1.0) is None  # the seed's port, not PEER's
    assert n.inbound(SEED, to_peer[1], 1.0) is None
    # Seeded: the same ports again.
    again = nat(NatType.SYMMETRIC, seed=5)
    assert again.outbound(HOST, SEED, 0.0) == to_seed
    assert again.outbound(HOST, PEER, 0.0) == to_peer


def test_unreplied_flows_expire_after_30_s_replied_after_120_s() -> None:
    n = nat(NatType.PORT_RESTRICTED)
    port = n.outbound(HOST, PEER, 0.0)[1]
    assert n.inbound(PEER, port, 29.9) == HOST  # a reply in time...
    assert n.inbound(PEER, port, 29.9 + 119.9) == HOST  # ...makes it last 120 s
    assert n.inbound(PEER, port, 29.9 + 119.9 + 120.0) is None
    assert len(n) == 0
    n.outbound(HOST, SEED, 300.0)
    assert n.inbound(SEED, port, 330.0) is None  # never answered: 30 s
    assert n.mappings(330.0) == []


def test_outbound_packets_refresh_their_flow() -> None:
    n = nat(NatType.SYMMETRIC)
    first = n.outbound(HOST, PEER, 0.0)
    for t in range(20, 200, 20):
        assert n.outbound(HOST, PEER, float(t)) == first  # keep-alives
    assert n.inbound(PEER, first[1], 200.0) == HOST
    # Once the mapping is gone, a symmetric NAT picks a new port.
    assert n.outbound(HOST, PEER, 200.0 + 120.0) != first


def test_a_reply_leaves_through_the_mapping_its_flow_came_in_by() -> None:
    # A symmetric mapping with a loose filter: PEER gets in through the
    # seed's mapping, and the host's answer goes out the same way (as
    # conntrack answers), not through a new mapping for PEER.
    n = nat(
        NatBehaviour(Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ENDPOINT_INDEPENDENT)
    )
    to_seed = n.outbound(HOST, SEED, 0.0)
    assert n.inbound(PEER, to_seed[1], 1.0) == HOST
    assert n.outbound(HOST, PEER, 1.5) == to_seed
    assert len(n) == 1
    (view,) = n.mappings(2.0)
    assert view.flows[PEER][0]  # seen both ways


def test_ports_are_kept_when_free_and_exhaustion_is_an_error() -> None:
    n = Nat(NatType.PORT_RESTRICTED, "203.0.113.11", port_range=(2000, 2001))
    assert n.outbound(("10.0.0.2", 2000), PEER, 0.0)[1] == 2000
    assert n.outbound(("10.0.0.3", 2000), PEER, 0.0)[1] == 2001
    with pytest.raises(RuntimeError, match="every external port"):
        n.outbound(("10.0.0.4", 2000), PEER, 0.0)
    with pytest.raises(ValueError, match="port range"):
        Nat(NatType.SYMMETRIC, "203.0.113.11", port_range=(0, 10))


# -- properties ------------------------------------------------------------------

BEHAVIOURS = st.builds(
    NatBehaviour, st.sampled_from(Mapping), st.sampled_from(Filtering)
)
INTERNALS = [HOST, OTHER_HOST, ("10.0.0.2", 5000)]
REMOTES = [SEED, PEER, PEER_OTHER_PORT, STRANGER]
STEPS = st.sampled_from([0.0, 0.5, 10.0, 29.9, 30.0, 31.0, 100.0, 119.9, 121.0])


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, Address, Address, float]]:
    """Packets in time order: ("out", internal, remote, t) or ("in",
    remote, (ip, port), t)."""
    ops: list[tuple[str, Address, Address, float]] = []
    now = 0.0
    ports = [1314, 5000]
    for _ in range(draw(st.integers(1, 40))):
        now += draw(STEPS)
        if draw(st.booleans()):
            ops.append(
                (
                    "out",
                    draw(st.sampled_from(INTERNALS)),
                    draw(st.sampled_from(REMOTES)),
                    now,
                )
            )
        else:
            port = draw(st.sampled_from(ports) | st.integers(1024, 65535))
            ops.append(("in", draw(st.sampled_from(REMOTES)), ("", port), now))
    return ops


@settings(max_examples=300)
@given(BEHAVIOURS, histories(), st.integers(0, 2**32))
def test_admission_is_exactly_what_the_mappings_allow(
    behaviour: NatBehaviour,
    history: list[tuple[str, Address, Address, float]],
    seed: int,
) -> None:
    """An admitted inbound packet always matches a live mapping whose filter
    allows its source, and goes to that mapping's host; one that matches
    none is dropped. And it is never admitted unless that host has sent
    through that port before, to a remote the filter allows within the
    flow's lifetime (history, not the NAT's own state)."""
    n = Nat(behaviour, "203.0.113.11", rng=random.Random(seed))
    # (internal, remote, port) -> time of the last packet either way
    last: dict[tuple[Address, Address, int], float] = {}
    sent_from: dict[int, set[Address]] = {}
    for kind, a, b, now in history:
        if kind == "out":
            ext = n.outbound(a, b, now)
            assert ext[0] == "203.0.113.11"
            last[a, b, ext[1]] = now
            sent_from.setdefault(ext[1], set()).add(a)
            continue
        source, port = a, b[1]
        views = [v for v in n.mappings(now) if v.external[1] == port]
        allowed = [
            v for v in views if any(behaviour.allows(r, source) for r in v.flows)
        ]
        got = n.inbound(source, port, now)
        event("admitted" if allowed else "dropped")
        if not allowed:
            assert got is None
            continue
        (view,) = allowed  # one mapping per external port
        assert got == view.internal
        assert got in sent_from[port]
        if behaviour.filtering is not Filtering.ENDPOINT_INDEPENDENT:
            assert any(
                behaviour.allows(r, source) and now - t < n.established_timeout
                for (i, r, p), t in last.items()
                if i == got and p == port
            )
        last[got, source, port] = now


@settings(max_examples=300)
@given(
    BEHAVIOURS,
    histories(),
    st.sampled_from(INTERNALS),
    st.sampled_from(REMOTES),
    st.floats(0.0, 29.99),
)
def test_an_answer_in_time_always_gets_in(
    behaviour: NatBehaviour,
    history: list[tuple[str, Address, Address, float]],
    internal: Address,
    remote: Address,
    delay: float,
) -> None:
    n = Nat(behaviour, "203.0.113.11", rng=random.Random(1))
    now = 0.0
    for kind, a, b, now in history:
        if kind == "out":
            n.outbound(a, b, now)
        else:
            n.inbound(a, b[1], now)
    ext = n.outbound(internal, remote, now)
    assert n.inbound(remote, ext[1], now + delay) == internal
    # Everything is forgotten once nothing has moved for 120 s.
    later = now + delay + n.established_timeout
    assert n.mappings(later) == []
    assert n.inbound(remote, ext[1], later) is None


@given(
    st.sampled_from([NatType.FULL_CONE, NatType.PORT_RESTRICTED, NatType.SYMMETRIC]),
    st.lists(st.sampled_from(REMOTES), min_size=1, unique=True),
)
def test_mapping_behaviour(kind: NatType, remotes: list[Address]) -> None:
    n = nat(kind)
    ports = {n.outbound(HOST, r, 0.0)[1] for r in remotes}
    if kind is NatType.SYMMETRIC:
        assert len(ports) == len(remotes)  # a new port per destination
    else:
        assert ports == {HOST[1]}  # one port, kept
