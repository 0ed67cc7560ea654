"""NodeGraph as pure logic: buckets, last-seen order, eviction, closest."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polykey.keys import NodeId, bucket_index
from polykey.nodes import (
    NodeAddress,
    NodeGraph,
    OwnNodeIdError,
    random_node_id_in_bucket,
)

from .helpers import addr, id_in_bucket, node_id

OWN = NodeId.from_int(0x5A << 248 | 0x1234)


def test_bucket_placement_is_highest_differing_bit() -> None:
    graph = NodeGraph(OWN)
    rng = random.Random(1)
    for index in (0, 1, 7, 8, 100, 254, 255):
        nid = id_in_bucket(OWN, index, rng)
        assert graph.bucket_index(nid) == index == bucket_index(OWN, nid)
        assert graph.add(nid, addr(index), 0.0).status == "added"
        assert graph.bucket(index)[0].node_id == nid
    assert graph.nonempty_buckets() == [0, 1, 7, 8, 100, 254, 255]
    assert len(graph) == 7


def test_own_node_id_is_refused() -> None:
    graph = NodeGraph(OWN)
    with pytest.raises(OwnNodeIdError):
        graph.add(OWN, addr(1), 0.0)
    with pytest.raises(OwnNodeIdError):
        graph.bucket_index(OWN)
    assert len(graph) == 0


def test_full_bucket_offers_least_recently_seen_and_eviction_makes_room() -> None:
    rng = random.Random(2)
    graph = NodeGraph(OWN, k=5)
    members = [id_in_bucket(OWN, 200, rng) for _ in range(5)]
    for i, nid in enumerate(members):
        assert graph.add(nid, addr(i), float(i)).status == "added"
    # Seeing members[0] again makes it the most recently seen.
    assert graph.add(members[0], addr(0), 10.0).status == "updated"
    newcomer = id_in_bucket(OWN, 200, rng)
    result = graph.add(newcomer, addr(9), 11.0)
    assert result.status == "full"
    assert result.bucket == 200
    assert [c.node_id for c in result.to_ping] == members[1:4]
    assert newcomer not in graph
    # A failed contact becomes least recently seen.
    graph.mark_failed(members[4])
    assert graph.least_recently_seen(200, 2)[0].node_id == members[4]
    assert graph.failures(members[4]) == 1
    assert graph.remove(members[4])
    assert graph.add(newcomer, addr(9), 12.0).status == "added"
    assert [c.node_id for c in graph.bucket(200)] == [
        *members[1:4],
        members[0],
        newcomer,
    ]
    # touch refreshes order and clears failures
    graph.mark_failed(members[2])
    assert graph.touch(members[2], 13.0)
    assert graph.failures(members[2]) == 0
    assert graph.bucket(200)[-1].node_id == members[2]
    assert not graph.touch(id_in_bucket(OWN, 3, rng), 0.0)


def test_addresses_newest_first_at_most_five() -> None:
    graph = NodeGraph(OWN)
    nid = node_id(7)
    graph.add(nid, addr(1), 0.0)
    for n in range(2, 9):
        graph.add(nid, [addr(n)], float(n))
    contact = graph.get(nid)
    assert contact is not None
    assert contact.addresses == (addr(8), addr(7), addr(6), addr(5), addr(4))
    graph.add(nid, addr(6), 9.0)
    contact = graph.get(nid)
    assert contact is not None
    assert contact.addresses[:2] == (addr(6), addr(8))
    assert graph.last_seen(nid) == 9.0


def test_random_node_id_in_bucket() -> None:
    rng = random.Random(3)
    for index in (0, 1, 2, 31, 128, 255):
        for _ in range(20):
            nid = random_node_id_in_bucket(OWN, index, rng)
            assert bucket_index(OWN, nid) == index
    with pytest.raises(ValueError, match="out of range"):
        random_node_id_in_bucket(OWN, 256, rng)


def test_closest_excludes_failed_on_request() -> None:
    graph = NodeGraph(OWN)
    a, b = node_id(OWN.to_int() ^ 1), node_id(OWN.to_int() ^ 2)
    graph.add(a, addr(1), 0.0)
    graph.add(b, addr(2), 0.0)
    graph.mark_failed(a)
    assert [c.node_id for c in graph.closest(OWN)] == [a, b]
    assert [c.node_id for c in graph.closest(OWN, exclude_failed=True)] == [b]
    assert graph.closest(OWN, 0) == []


def test_failures_of_overlapping_attempts_count_once() -> None:
    graph = NodeGraph(OWN)
    a = node_id(OWN.to_int() ^ 1)
    graph.add(a, addr(1), 0.0)
    # Three attempts began at 10 and failed at 12, 12.1, 12.2 (one stall of
    # ours caught all three): one failure.
    assert graph.mark_failed(a, now=12.0, began=10.0) == 1
    assert graph.mark_failed(a, now=12.1, began=10.0) == 1
    assert graph.mark_failed(a, now=12.2, began=11.9) == 1
    # One that began once the first was noted is a try of its own.
    assert graph.mark_failed(a, now=14.0, began=12.0) == 2
    assert graph.mark_failed(a, now=16.0, began=14.5) == 3
    assert graph.failures(a) == 3
    # Without a start, every failure counts (as before).
    assert graph.mark_failed(a) == 4
    # Seen again: the count and the last failure's time are forgotten.
    assert graph.touch(a, 20.0)
    assert graph.mark_failed(a, now=21.0, began=0.0) == 1


# -- model-based: the graph against a brute-force reference -------------------

K = 3


class Model:
    """Buckets as plain lists, least recently seen first; closest by sorting."""

    def __init__(self, own: NodeId) -> None:
        self.own = own
        self.buckets: dict[int, list[NodeId]] = {}

    def add(self, nid: NodeId) -> tuple[str, list[NodeId]]:
        bucket = self.buckets.setdefault(bucket_index(self.own, nid), [])
        if nid in bucket:
            bucket.remove(nid)
            bucket.append(nid)
            return "updated", []
        if len(bucket) >= K:
            return "full", bucket[:3]
        bucket.append(nid)
        return "added", []

    def touch(self, nid: NodeId) -> bool:
        bucket = self.buckets.get(bucket_index(self.own, nid), [])
        if nid not in bucket:
            return False
        bucket.remove(nid)
        bucket.append(nid)
        return True

    def fail(self, nid: NodeId) -> None:
        bucket = self.buckets.get(bucket_index(self.own, nid), [])
        if nid in bucket:
            bucket.remove(nid)
            bucket.insert(0, nid)

    def remove(self, nid: NodeId) -> bool:
        bucket = self.buckets.get(bucket_index(self.own, nid), [])
        if nid in bucket:
            bucket.remove(nid)
            return True
        return False

    def all(self) -> list[NodeId]:
        return [n for b in self.buckets.values() for n in b]


# Ids near OWN (many per low bucket) and a few far ones, so buckets fill up.
ids = st.one_of(
    st.integers(1, 63).map(lambda x: NodeId.from_int(OWN.to_int() ^ x)),
    st.integers(1, 2**256 - 1).map(NodeId.from_int).filter(lambda n: n != OWN),
)
ops = st.lists(
    st.tuples(st.sampled_from(["add", "add", "add", "touch", "fail", "remove"]), ids),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    ops,
    st.lists(st.integers(0, 2**256 - 1), min_size=1, max_size=5),
    st.integers(0, 30),
)
def test_graph_matches_model(
    operations: list[tuple[str, NodeId]], targets: list[int], limit: int
) -> None:
    graph = NodeGraph(OWN, k=K)
    model = Model(OWN)
    address = NodeAddress("10.0.0.1", 1)
    for step, (op, nid) in enumerate(operations):
        if op == "add":
            result = graph.add(nid, address, float(step))
            status, to_ping = model.add(nid)
            assert result.status == status
            assert [c.node_id for c in result.to_ping] == to_ping
        elif op == "touch":
            assert graph.touch(nid, float(step)) == model.touch(nid)
        elif op == "fail":
            graph.mark_failed(nid)
            model.fail(nid)
        else:
            assert graph.remove(nid) == model.remove(nid)
    for index, members in model.buckets.items():
        assert [c.node_id for c in graph.bucket(index)] == members
    assert len(graph) == len(model.all())
    for t in [*targets, OWN.to_int()]:
        target = NodeId.from_int(t)
        expected = sorted(model.all(), key=lambda n: n.to_int() ^ t)[:limit]
        assert [c.node_id for c in graph.closest(target, limit)] == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 400))
def test_closest_exact_on_large_random_tables(seed: int, n: int) -> None:
    rng = random.Random(seed)
    graph = NodeGraph(OWN)
    for _ in range(n):
        graph.add(NodeId(rng.randbytes(32)), addr(1), 0.0)
    members = [c.node_id for c in graph]
    for _ in range(5):
        t = rng.getrandbits(256)
        expected = sorted(members, key=lambda m: m.to_int() ^ t)[:20]
        assert [c.node_id for c in graph.closest(NodeId.from_int(t))] == expected
