"""NodeGraph: the Kademlia k-bucket table, as pure logic.

Theory of operation
-------------------
Seen from our NodeId, every other NodeId falls in one of 256 buckets: the
index of the highest bit in which the two differ (0 closest, 255 farthest;
:func:`polykey.keys.bucket_index`). A bucket holds at most ``k`` (20) nodes
in last-seen order, least recently seen first. Each node keeps up to 5
addresses, most recently seen first.

Adding a node to a full bucket does not insert it. :meth:`NodeGraph.add`
returns ``"full"`` and the least-recently-seen members (3 at a time) for the
caller to ping; the caller removes those that fail and adds the newcomer
again (Kademlia prefers old, proven nodes). The graph never does I/O on the
network and never reads a clock: callers pass ``now``.

:meth:`NodeGraph.closest` is exact by XOR distance without scanning the
table: for a target in bucket ``b`` every node of bucket ``b`` is closer than
every node of buckets below ``b``, which are all closer than bucket ``b+1``,
then ``b+2``... So it sorts bucket ``b``, then the union of buckets below
it, then the buckets above it one by one, and stops at ``limit``.

Persistence (optional, :meth:`NodeGraph.open`) is a SQLite file in WAL mode
(``_store.py``). By itself the graph commits adds, address changes and
removals before the call returns. Last-seen refreshes (:meth:`touch`), which
happen on every contact, are only marked dirty and written with the next
commit or :meth:`flush`: a crash can lose recent reordering, never a node.
Failure counts are in memory only.

A commit waits for the disk (``synchronous=FULL``: an fsync, milliseconds
each), so in a running node writes leave the event loop:
:class:`~polykey.nodes.GraphWriter` calls :meth:`defer_writes`, after which
a mutation only records what is pending (the graph in memory is already
up to date) and wakes the writer, which writes every pending change in one
transaction in a worker thread. What is acknowledged as committed is what
:meth:`GraphWriter.durable` has returned for; a crash loses nothing of that.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final, Literal, Protocol

import attrs

from ..keys import NodeId
from ._address import NodeAddress, NodeContact
from ._errors import OwnNodeIdError

__all__ = [
    "BUCKET_COUNT",
    "DEFAULT_K",
    "PING_BATCH",
    "AddResult",
    "NodeGraph",
    "random_node_id_in_bucket",
]

BUCKET_COUNT: Final = 256
DEFAULT_K: Final = 20
#: Least-recently-seen members offered for pinging per full-bucket add.
PING_BATCH: Final = 3

_log = logging.getLogger("polykey.nodes.graph")


@attrs.define(slots=True, eq=False)
class _Entry:
    contact: NodeContact
    #: The NodeId as an int, for XOR distances without conversions.
    value: int
    last_seen: float
    seq: int
    failures: int = 0
    #: When the last failure counted in ``failures`` was noted (the
    #: caller's clock; not persisted).
    failed_at: float = -math.inf


@attrs.frozen
class AddResult:
    """What :meth:`NodeGraph.add` did.

    ``"added"``: inserted; ``"updated"``: it was there, now most recently
    seen; ``"full"``: not inserted, ping ``to_ping`` (least recently seen
    first) and evict the dead to make room.
    """

    status: Literal["added", "updated", "full"]
    bucket: int
    to_ping: tuple[NodeContact, ...] = ()


def _as_addresses(addresses: NodeAddress | Iterable[NodeAddress]) -> list[NodeAddress]:
    if isinstance(addresses, NodeAddress):
        return [addresses]
    return list(addresses)


def random_node_id_in_bucket(own_id: NodeId, index: int, rng: random.Random) -> NodeId:
    """A uniformly random NodeId whose bucket (seen from ``own_id``) is
    ``index``: the distance has bit ``index`` set and nothing above it."""
    if not 0 <= index < BUCKET_COUNT:
        raise ValueError(f"bucket index {index} out of range 0..255")
    distance = (1 << index) | rng.getrandbits(index)
    return NodeId.from_int(own_id.to_int() ^ distance)


class NodeGraph:
    """The k-bucket table of the node ``own_id``.

    Pure logic; give it a store (see :meth:`open`) to persist it. Every
    method is synchronous and cheap; none blocks on the network.
    """

    def __init__(
        self, own_id: NodeId, *, k: int = DEFAULT_K, store: _StoreLike | None = None
    ) -> None:
        if not isinstance(own_id, NodeId):
            raise TypeError("own_id must be a NodeId")
        if not 1 <= k <= 1000:
            raise ValueError("k must be in 1..1000")
        self.own_id = own_id
        self.k = k
        self._own_raw = own_id.raw
        self._own_int = own_id.to_int()
        # Keyed by the raw id (C-level hashing). Insertion order is last-seen
        # order: least recently seen first.
        self._buckets: list[dict[bytes, _Entry]] = [{} for _ in range(BUCKET_COUNT)]
        self._index: dict[bytes, int] = {}
        # Bit i set when bucket i is non-empty: closest() skips empty buckets.
        self._nonempty = 0
        self._seq = 0
        self._store = store
        self._dirty: set[bytes] = set()
        # Deferred writes (see defer_writes): what is pending, and the
        # writer to wake. ``version`` counts commits asked for.
        self._defer: Callable[[], None] | None = None
        self._pending_up: set[bytes] = set()
        self._pending_del: set[bytes] = set()
        self.version = 0
        if store is not None:
            self._load(store)

    # -- persistence -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        own_id: NodeId,
        *,
        k: int = DEFAULT_K,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        previous_ids: Iterable[NodeId] = (),
    ) -> NodeGraph:
        """The graph persisted in the SQLite file ``path`` (created if absent).

        Raises :class:`~polykey.nodes.NodeGraphStoreError` (corrupt, foreign,
        newer version, or another node's graph) without touching the file.
        A graph owned by one of ``previous_ids`` (NodeIds this node had
        before key renewals) is taken over for ``own_id``.
        """
        from ._store import SQLiteGraphStore

        store = SQLiteGraphStore(
            Path(path),
            own_id,
            synchronous=synchronous,
            previous_ids=frozenset(previous_ids),
        )
        try:
            return cls(own_id, k=k, store=store)
        except BaseException:
            store.close()
            raise

    def _load(self, store: _StoreLike) -> None:
        rows = sorted(store.load(), key=lambda row: row[3])
        for node_id, addresses, last_seen, seq in rows:
            raw = node_id.raw
            if raw == self._own_raw:
                continue
            index = self._bucket_of(node_id)
            contact = NodeContact(node_id, addresses)
            self._buckets[index][raw] = _Entry(
                contact, node_id.to_int(), last_seen, seq
            )
            self._index[raw] = index
            self._nonempty |= 1 << index
            self._seq = max(self._seq, seq)
        for index, bucket in enumerate(self._buckets):
            if len(bucket) > self.k:
                # k was lowered since the file was written: keep the most
                # recently seen, and say what goes (never silently).
                extra = list(bucket)[: len(bucket) - self.k]
                _log.warning(
                    "bucket %d holds %d nodes, more than k=%d: dropping %d least "
                    "recently seen",
                    index,
                    len(bucket),
                    self.k,
                    len(extra),
                )
                for raw in extra:
                    del bucket[raw]
                    del self._index[raw]
                store.write([], [NodeId(raw) for raw in extra])

    def _commit(
        self, upserts: Iterable[bytes] = (), deletes: Iterable[bytes] = ()
    ) -> None:
        if self._store is None:
            return
        dirty = self._dirty
        dirty.update(upserts)
        deleted = set(deletes)
        dirty.difference_update(deleted)
        self.version += 1
        if self._defer is not None:
            self._pending_up.difference_update(deleted)
            self._pending_up.update(dirty)
            self._pending_del.difference_update(dirty)
            self._pending_del.update(deleted)
            dirty.clear()
            self._defer()
            return
        rows = self._rows(dirty)
        self._store.write(rows, [NodeId(raw) for raw in deleted])
        dirty.clear()

    def _rows(self, raws: Iterable[bytes]) -> list[StoredNode]:
        rows: list[StoredNode] = []
        for raw in raws:
            entry = self._entry(raw)
            if entry is not None:
                contact = entry.contact
                rows.append(
                    (contact.node_id, contact.addresses, entry.last_seen, entry.seq)
                )
        return rows

    # -- deferred writes (GraphWriter) ----------------------------------------------

    def defer_writes(self, wake: Callable[[], None] | None) -> None:
        """From now on, record mutations as pending and call ``wake()``
        instead of writing (None: write at once again, pending first)."""
        self._defer = wake
        if wake is None and (self._pending_up or self._pending_del):
            rows, deletes, _ = self.take_pending()
            self.write(rows, deletes)

    def take_pending(self) -> tuple[list[StoredNode], list[NodeId], int]:
        """What is pending (rows as they are now, deletions) and the
        ``version`` it brings the store to; nothing is pending after."""
        rows = self._rows(self._pending_up)
        deletes = [NodeId(raw) for raw in self._pending_del]
        self._pending_up.clear()
        self._pending_del.clear()
        return rows, deletes, self.version

    def restore_pending(self, rows: list[StoredNode], deletes: list[NodeId]) -> None:
        """Put back what :meth:`take_pending` gave for a write that failed
        (changes made since then win)."""
        for node_id, *_ in rows:
            if node_id.raw not in self._pending_del:
                self._pending_up.add(node_id.raw)
        for node_id in deletes:
            if node_id.raw not in self._pending_up:
                self._pending_del.add(node_id.raw)

    def write(self, rows: list[StoredNode], deletes: list[NodeId]) -> None:
        """Write ``rows`` and ``deletes`` in one transaction (the writer
        calls this from its worker thread: it touches only the store)."""
        if self._store is not None and (rows or deletes):
            self._store.write(rows, deletes)

    def flush(self) -> None:
        """Write pending last-seen updates (a no-op without a store)."""
        if self._dirty:
            self._commit()

    def close(self) -> None:
        """Flush and close the store. The graph stays usable in memory."""
        if self._store is not None:
            try:
                self.defer_writes(None)
                self.flush()
            finally:
                self._store.close()
                self._store = None

    def __enter__(self) -> NodeGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def persistent(self) -> bool:
        return self._store is not None

    # -- queries -----------------------------------------------------------------

    def _bucket_of(self, node_id: NodeId) -> int:
        d = int.from_bytes(node_id.raw, "big") ^ self._own_int
        if d == 0:
            raise OwnNodeIdError("a node's own NodeId is not a contact")
        return d.bit_length() - 1

    def bucket_index(self, node_id: NodeId) -> int:
        """The bucket ``node_id`` falls in (OwnNodeIdError for our own)."""
        return self._bucket_of(node_id)

    def _entry(self, raw: bytes) -> _Entry | None:
        index = self._index.get(raw)
        if index is None:
            return None
        return self._buckets[index][raw]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, NodeId) and node_id.raw in self._index

    def __iter__(self) -> Iterator[NodeContact]:
        for bucket in self._buckets:
            for entry in bucket.values():
                yield entry.contact

    def get(self, node_id: NodeId) -> NodeContact | None:
        entry = self._entry(node_id.raw)
        return None if entry is None else entry.contact

    def last_seen(self, node_id: NodeId) -> float | None:
        entry = self._entry(node_id.raw)
        return None if entry is None else entry.last_seen

    def failures(self, node_id: NodeId) -> int:
        entry = self._entry(node_id.raw)
        return 0 if entry is None else entry.failures

    def bucket(self, index: int) -> list[NodeContact]:
        """Members of bucket ``index``, least recently seen first."""
        return [entry.contact for entry in self._buckets[index].values()]

    def bucket_size(self, index: int) -> int:
        return len(self._buckets[index])

    def is_full(self, index: int) -> bool:
        return len(self._buckets[index]) >= self.k

    def nonempty_buckets(self) -> list[int]:
        return [i for i in range(BUCKET_COUNT) if self._nonempty >> i & 1]

    def least_recently_seen(
        self, index: int, count: int = PING_BATCH
    ) -> list[NodeContact]:
        """Up to ``count`` members of bucket ``index``, oldest first."""
        out: list[NodeContact] = []
        for entry in self._buckets[index].values():
            if len(out) >= count:
                break
            out.append(entry.contact)
        return out

    def closest(
        self, target: NodeId, limit: int | None = None, *, exclude_failed: bool = False
    ) -> list[NodeContact]:
        """The ``limit`` (default k) known nodes closest to ``target`` by XOR
        distance, closest first. ``target`` itself is included if known."""
        limit = self.k if limit is None else limit
        if limit <= 0:
            return []
        t = int.from_bytes(target.raw, "big")
        d = self._own_int ^ t
        groups = _groups(self._buckets, self._nonempty, d.bit_length() - 1)
        out: list[NodeContact] = []
        for group in groups:
            if len(group) == 1:
                entries = list(group[0].values())
            else:
                entries = [e for bucket in group for e in bucket.values()]
            if exclude_failed:
                entries = [e for e in entries if not e.failures]
            if not entries:
                continue
            if len(entries) > 1:
                entries.sort(key=lambda e: e.value ^ t)
            out.extend([e.contact for e in entries[: limit - len(out)]])
            if len(out) >= limit:
                break
        return out

    # -- mutations -----------------------------------------------------------

    def add(
        self,
        node_id: NodeId,
        addresses: NodeAddress | Iterable[NodeAddress],
        now: float,
        *,
        ping_batch: int = PING_BATCH,
    ) -> AddResult:
        """Insert ``node_id`` or refresh it as just seen (committed).

        New addresses go first; at most 5 are kept. On a full bucket nothing
        changes and the least-recently-seen members are returned to ping.
        """
        index = self._bucket_of(node_id)
        raw = node_id.raw
        new = _as_addresses(addresses)
        bucket = self._buckets[index]
        entry = bucket.pop(raw, None)
        if entry is not None:
            old = entry.contact.addresses
            if tuple(new) != old[: len(new)]:
                merged = new + [a for a in old if a not in new]
                entry.contact = NodeContact(node_id, merged)
            entry.last_seen = now
            entry.failures = 0
            entry.failed_at = -math.inf
            entry.seq = self._next_seq()
            bucket[raw] = entry
            self._commit([raw])
            return AddResult("updated", index)
        if len(bucket) >= self.k:
            return AddResult(
                "full", index, tuple(self.least_recently_seen(index, ping_batch))
            )
        contact = NodeContact(node_id, new)
        bucket[raw] = _Entry(contact, int.from_bytes(raw, "big"), now, self._next_seq())
        self._index[raw] = index
        self._nonempty |= 1 << index
        self._commit([raw])
        return AddResult("added", index)

    def add_contact(self, contact: NodeContact, now: float) -> AddResult:
        """:meth:`add` with a contact (kept as is when it is new)."""
        if contact.node_id.raw not in self._index:
            index = self._bucket_of(contact.node_id)
            bucket = self._buckets[index]
            if len(bucket) < self.k and contact.addresses:
                raw = contact.node_id.raw
                value = int.from_bytes(raw, "big")
                bucket[raw] = _Entry(contact, value, now, self._next_seq())
                self._index[raw] = index
                self._nonempty |= 1 << index
                self._commit([raw])
                return AddResult("added", index)
        return self.add(contact.node_id, contact.addresses, now)

    def touch(self, node_id: NodeId, now: float) -> bool:
        """Mark a known node as just seen (persisted lazily). False if unknown."""
        raw = node_id.raw
        index = self._index.get(raw)
        if index is None:
            return False
        bucket = self._buckets[index]
        entry = bucket.pop(raw)
        entry.last_seen = now
        entry.failures = 0
        entry.failed_at = -math.inf
        entry.seq = self._next_seq()
        bucket[raw] = entry
        if self._store is not None:
            self._dirty.add(raw)
        return True

    def mark_failed(
        self, node_id: NodeId, *, now: float | None = None, began: float | None = None
    ) -> int:
        """Record a failed contact; the node becomes least recently seen.

        Returns its consecutive failure count (0 if unknown). ``began``:
        when the failed attempt began, and ``now``, on the same clock: an
        attempt that began before the last failure counted was noted
        overlapped it, and shares its outage (a stall of ours, a burst of
        loss), so it is not counted again: failures in a row are attempts
        one after another. The order change is not persisted: after a
        restart a node gets a new chance.
        """
        raw = node_id.raw
        index = self._index.get(raw)
        if index is None:
            return 0
        bucket = self._buckets[index]
        entry = bucket.pop(raw)
        if began is None or began >= entry.failed_at:
            entry.failures += 1
            if now is not None:
                entry.failed_at = now
        rest = list(bucket.items())
        bucket.clear()
        bucket[raw] = entry
        bucket.update(rest)
        return entry.failures

    def remove(self, node_id: NodeId) -> bool:
        """Remove ``node_id`` (committed). False if it was not there."""
        raw = node_id.raw
        index = self._index.pop(raw, None)
        if index is None:
            return False
        bucket = self._buckets[index]
        del bucket[raw]
        if not bucket:
            self._nonempty &= ~(1 << index)
        self._dirty.discard(raw)
        self._commit(deletes=[raw])
        return True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def random_node_id_in_bucket(self, index: int, rng: random.Random) -> NodeId:
        return random_node_id_in_bucket(self.own_id, index, rng)

    def statistics(self) -> dict[str, int | float]:
        sizes = [len(b) for b in self._buckets]
        nonempty = [i for i, n in enumerate(sizes) if n]
        return {
            "nodes": len(self._index),
            "nonempty_buckets": len(nonempty),
            "full_buckets": sum(1 for n in sizes if n >= self.k),
            "closest_bucket": nonempty[0] if nonempty else math.nan,
            "dirty": len(self._dirty),
        }


def _groups(
    buckets: list[dict[bytes, _Entry]], nonempty: int, top: int
) -> Iterator[list[dict[bytes, _Entry]]]:
    """Non-empty buckets in the order their nodes are close to a target
    in bucket ``top`` (``-1``: the target is our own id)."""
    if top < 0:
        above = nonempty
    else:
        if nonempty >> top & 1:
            yield [buckets[top]]
        below = nonempty & ((1 << top) - 1)
        group = []
        while below:
            i = below.bit_length() - 1
            group.append(buckets[i])
            below ^= 1 << i
        if group:
            yield group
        above = nonempty >> (top + 1) << (top + 1)
    while above:
        low = above & -above
        yield [buckets[low.bit_length() - 1]]
        above ^= low


#: One persisted node: id, addresses, last seen (caller's clock), order.
StoredNode = tuple[NodeId, tuple[NodeAddress, ...], float, int]


class _StoreLike(Protocol):
    """What the graph needs of a store (``_store.SQLiteGraphStore``)."""

    def load(self) -> list[StoredNode]: ...

    def write(self, upserts: list[StoredNode], deletes: list[NodeId]) -> None: ...

    def close(self) -> None: ...
