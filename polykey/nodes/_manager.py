"""NodeManager: the trio driver around the graph and the lookup machine.

Theory of operation
-------------------
* **Contacts.** Every node that answers us (a lookup query, a ping) or
  connects to us (the connection manager's ``on_connection`` calls
  :meth:`NodeManager.note_contact`) is refreshed in the graph. A newcomer
  for a full bucket waits in a bounded per-bucket queue; the eviction
  worker pings the bucket's 3 least-recently-seen members (unless seen within
  ``fresh_interval``), evicts those that
  fail and inserts waiting newcomers into the room made; the rest are
  dropped (and counted). A node that fails ``max_failures`` times in a row
  is removed.
* **Unconfirmed nodes.** A node new to us that connected to us is in the
  graph while its connection lives; when its last connection ends it is
  dialled back (``dialback_limit`` at once, ``dialback_queue`` waiting, one
  per NodeId) and stays only if that reaches it (:meth:`note_disconnect`).
* **Lookups.** :meth:`lookup` drives a :class:`~polykey.nodes.Lookup`: each
  query is a task in one nursery (at most alpha = 3 at a time), bounded by
  ``query_timeout``; the whole lookup by ``lookup_timeout``. In find mode
  (:meth:`find_node`) the target's answer cancels the queries still running.
* **Timers.** :meth:`run` owns the background tasks: bucket refreshes (a
  lookup of a random NodeId in the bucket, every ``refresh_interval`` with
  jitter; buckets below the closest non-empty one are left to the
  self-lookup, which covers them), the self-lookup every
  ``self_lookup_interval``, the eviction worker, the graph's writer (SQLite
  off the event loop, see ``_writer.py``) and periodic flushes.
* **Joining.** :meth:`join`: add the seeds, ping the closest few, look up our
  own NodeId, then refresh every bucket farther than our closest neighbour,
  farthest first (Kademlia's join; Polykey's syncNodeGraph).

Timers use trio's clock (so MockClock drives them); graph timestamps use
``clock`` (wall time by default, for ``connectedTime``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
import trio

from ..keys import NodeId
from ._address import NodeAddress, NodeContact, format_host_port
from ._attempts import AttemptTimer
from ._errors import InvalidAddressError, NodeNotFoundError, OwnNodeIdError
from ._failures import note_failure
from ._graph import PING_BATCH, NodeGraph
from ._lookup import DEFAULT_ALPHA, DEFAULT_MAX_CONTACTED, Lookup
from ._refresh import RefreshSchedule
from ._transport import NodeTransport
from ._writer import GraphWriter

__all__ = [
    "JoinResult",
    "LookupResult",
    "NodeManager",
    "NodeManagerConfig",
    "NodeManagerStatistics",
]

log = logging.getLogger("polykey.nodes.manager")

#: ``timer_events`` entry for the self-lookup.
SELF_LOOKUP: Final = -1


@attrs.frozen(kw_only=True)
class NodeManagerConfig:
    """Tunables; the defaults are Polykey's (docs/nodes.md, "Polykey compatibility")."""

    alpha: int = DEFAULT_ALPHA
    max_contacted: int = DEFAULT_MAX_CONTACTED
    #: Least-recently-seen members pinged per full-bucket add.
    ping_batch: int = PING_BATCH
    #: A member seen (answered or connected) less than this many seconds
    #: ago counts as alive without a ping. Polykey always pings; without
    #: this, a popular node pings the same live members for every newcomer.
    fresh_interval: float = 60.0
    #: Seconds for one attempt (connect + call) to one node: the ceiling
    #: when the manager is given an ``attempts`` timer.
    query_timeout: float = 15.0
    #: Seconds for a whole lookup.
    lookup_timeout: float = 60.0
    #: Bucket refresh period (None: no bucket refresh timers).
    refresh_interval: float | None = 3600.0
    #: Self-lookup period (None: none).
    self_lookup_interval: float | None = 45.0
    refresh_jitter: float = 0.5
    #: Consecutive failed contacts after which a node leaves the graph.
    max_failures: int = 3
    #: Newcomers waiting for room in full buckets (beyond: dropped).
    max_pending: int = 256
    #: Seeds pinged at join (the closest ones to us).
    seed_connect: int = 3
    #: Seconds between writes of pending last-seen updates.
    flush_interval: float = 30.0
    #: Dial-backs of unconfirmed nodes run at once (0: none; such nodes
    #: then leave with their connection, as before dial-backs).
    dialback_limit: int = 4
    #: Unconfirmed nodes waiting for a dial-back (beyond: not dialled
    #: back, counted in ``dialbacks_dropped``).
    dialback_queue: int = 64


@attrs.define
class NodeManagerStatistics:
    lookups: int = 0
    #: Rounds of every lookup, summed (with lookups: the mean).
    lookup_rounds: int = 0
    lookups_timed_out: int = 0
    finds: int = 0
    finds_failed: int = 0
    queries: int = 0
    query_failures: int = 0
    pings: int = 0
    ping_failures: int = 0
    evictions: int = 0
    removed_failing: int = 0
    #: Nodes that only ever connected to us, gone with their connection.
    removed_unconfirmed: int = 0
    #: Dial-backs of unconfirmed nodes tried, and of those, the ones that
    #: reached the node (which confirmed it) and the ones that failed.
    dialbacks: int = 0
    confirmed_by_dialback: int = 0
    dialback_failed: int = 0
    #: Not tried: confirmed or gone meanwhile, or a dial to it in flight.
    dialbacks_skipped: int = 0
    #: Not queued: ``dialback_queue`` was full.
    dialbacks_dropped: int = 0
    pending_dropped: int = 0
    newcomers_dropped: int = 0
    refreshes: int = 0
    self_lookups: int = 0
    transport_errors: int = 0
    #: Of those, bugs of ours rather than a peer's failure (logged at
    #: WARNING with the traceback; the attempt fails, the node runs on).
    unexpected_errors: int = 0
    #: Entries of peers' answers that were ignored (bogus, ours, repeats,
    #: beyond the cap).
    ignored_entries: int = 0
    pending: int = 0


@attrs.frozen
class LookupResult:
    """The outcome of one lookup."""

    target: NodeId
    #: The k closest nodes that responded, closest first.
    contacts: tuple[NodeContact, ...]
    #: Find mode: the target, if it answered.
    found: NodeContact | None
    rounds: int
    found_round: int | None
    learned_round: int | None
    queries: int
    failures: int
    timed_out: bool


@attrs.frozen
class JoinResult:
    seeds_reached: int
    self_lookup: LookupResult
    refreshed: tuple[int, ...]


class NodeManager:
    """Kademlia for one node: ``graph`` + ``transport`` + timers.

    ``async with trio.open_nursery() as n: await n.start(manager.run)`` runs
    the background work; lookups and pings work without it (the timers and
    the eviction worker then do not run).
    """

    def __init__(
        self,
        graph: NodeGraph,
        transport: NodeTransport,
        *,
        config: NodeManagerConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        attempts: AttemptTimer | None = None,
    ) -> None:
        """``attempts``, when given (the connection manager's
        :attr:`~polykey.nodes.NodeConnectionManager.attempts`), bounds each
        ping and query by what attempts have taken and by how
        often that peer has just failed, instead of ``config.query_timeout``
        alone, which stays the ceiling; every ping and query that succeeds
        is reported to it."""
        self.graph = graph
        self.writer = GraphWriter(graph)
        self._attempts = attempts
        self.own_id = graph.own_id
        self.transport = transport
        self.config = config or NodeManagerConfig()
        self._rng = rng or random.Random()
        self._clock = clock
        self.schedule = RefreshSchedule(
            bucket_interval=self.config.refresh_interval,
            self_interval=self.config.self_lookup_interval,
            jitter=self.config.refresh_jitter,
            rng=self._rng,
        )
        self._pending: dict[int, dict[NodeId, tuple[NodeAddress, ...]]] = {}
        # Nodes in the graph only because they connected to us.
        self._unconfirmed: set[NodeId] = set()
        # Nodes with a live (non-relayed) connection, by the callbacks.
        self._connected: set[NodeId] = set()
        # Unconfirmed nodes to dial back (one entry per NodeId, queued or
        # being dialled: _dialbacks), worked by dialback_limit tasks.
        self._dialbacks: set[NodeId] = set()
        self._dialback_send, self._dialback_receive = trio.open_memory_channel[
            tuple[NodeId, NodeAddress]
        ](max(self.config.dialback_queue, 0))
        #: The lookups running now (for progress reports; read only).
        self.running_lookups: list[Lookup] = []
        self._pending_count = 0
        self._wake_evictor = trio.Event()
        self._stats = NodeManagerStatistics()
        #: (trio time, bucket or SELF_LOOKUP) of recent timer-driven lookups.
        self.timer_events: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=1024
        )
        self.running = False

    # -- background --------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Timers, eviction worker and flushes; runs until cancelled."""
        if self.running:
            raise RuntimeError("NodeManager.run is already running")
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                self.schedule.start(trio.current_time())
                nursery.start_soon(self._timers)
                nursery.start_soon(self._evictor)
                for _ in range(self.config.dialback_limit):
                    nursery.start_soon(self._dialback_worker)
                if self.graph.persistent:
                    # SQLite writes leave the event loop (see GraphWriter).
                    await nursery.start(self.writer.run)
                    nursery.start_soon(self._flusher)
                task_status.started()
        finally:
            self.running = False
            self.graph.flush()

    async def _timers(self) -> None:
        schedule = self.schedule
        while True:
            await trio.sleep_until(schedule.next_deadline())
            now = trio.current_time()
            if schedule.self_due(now):
                self.timer_events.append((now, SELF_LOOKUP))
                await self._self_lookup()
            for index in schedule.due_buckets(now):
                nonempty = self.graph.nonempty_buckets()
                if nonempty and index >= nonempty[0]:
                    self.timer_events.append((now, index))
                    await self.refresh_bucket(index)
                # Else nothing is that close: the self-lookup covers it.
                schedule.bucket_refreshed(index, trio.current_time())

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            self.graph.flush()

    async def _evictor(self) -> None:
        while True:
            await self._wake_evictor.wait()
            self._wake_evictor = trio.Event()
            while self._pending:
                index = next(iter(self._pending))
                newcomers = self._pending.pop(index)
                self._pending_count -= len(newcomers)
                await self._make_room(index, newcomers)

    # -- contacts ------------------------------------------------------------

    def note_contact(
        self, node_id: NodeId, addresses: NodeAddress | Iterable[NodeAddress]
    ) -> None:
        """``node_id`` was just seen at ``addresses`` (verified by the caller).

        Synchronous: a newcomer for a full bucket is queued for the eviction
        worker (bounded; dropped and counted when the queue is full).
        """
        if node_id == self.own_id:
            return
        addrs = (addresses,) if isinstance(addresses, NodeAddress) else tuple(addresses)
        if not addrs:
            self.graph.touch(node_id, self._clock())
            return
        result = self.graph.add(
            node_id, addrs, self._clock(), ping_batch=self.config.ping_batch
        )
        if result.status == "full":
            self._queue(result.bucket, node_id, addrs)

    def note_connection(
        self, node_id: NodeId, host: str, port: int, outgoing: bool = True
    ) -> None:
        """:meth:`note_contact` for the connection manager's ``on_connection``
        callback: an address we cannot dial back (scoped IPv6, ...) only
        refreshes a known node; it never raises.

        A node new to the graph that connected to us (``outgoing`` false) is
        *unconfirmed*: nothing says others can reach it (a public seed meets
        thousands of short-lived clients, and nodes behind NATs). It stays
        while its connection lives, which is when others can reach it,
        through us as their signaller; when the connection ends it leaves
        the graph (:meth:`note_disconnect`), unless we reached it ourselves
        meanwhile. A node we dialled is confirmed; so is one that a
        dial-back reaches when its connection has ended (see
        :meth:`note_disconnect`).
        """
        try:
            address = NodeAddress(host, port)
        except InvalidAddressError:
            self.graph.touch(node_id, self._clock())
            return
        self._connected.add(node_id)
        if outgoing:
            self._unconfirmed.discard(node_id)
        elif node_id not in self.graph:
            self._unconfirmed.add(node_id)
        self.note_contact(node_id, address)

    def note_disconnect(self, node_id: NodeId) -> None:
        """The last connection to ``node_id`` ended: an unconfirmed node is
        dialled back (:meth:`_dial_back`), and leaves the graph unless that
        reaches it; at once when no dial-back can be queued.

        Why then and not when it connects: a client that calls once and
        goes would answer a dial-back made while it is there, and be kept,
        dead, as a node we dialled is; after its connection, only a node
        still serving its NodeId at that address answers."""
        self._connected.discard(node_id)
        if node_id not in self._unconfirmed:
            return
        known = self.graph.get(node_id)
        if (
            known is not None
            and known.addresses
            and self._queue_dialback(node_id, known.addresses[0])
        ):
            return
        self._remove_unconfirmed(node_id)

    def _remove_unconfirmed(self, node_id: NodeId) -> None:
        self._unconfirmed.discard(node_id)
        if self.graph.remove(node_id):
            self._stats.removed_unconfirmed += 1
            log.info("%s left the graph: unconfirmed, disconnected", node_id)

    def confirmed(self, node_id: NodeId) -> bool:
        """Whether ``node_id`` is known reachable (not only connected to us)."""
        return node_id not in self._unconfirmed

    def _queue_dialback(self, node_id: NodeId, address: NodeAddress) -> bool:
        """Whether a dial-back of ``node_id`` is queued or under way."""
        if node_id in self._dialbacks:
            return True
        if self.config.dialback_limit <= 0 or not self.running:
            return False
        try:
            self._dialback_send.send_nowait((node_id, address))
        except trio.WouldBlock:
            self._stats.dialbacks_dropped += 1
            return False
        self._dialbacks.add(node_id)
        return True

    async def _dialback_worker(self) -> None:
        while True:
            node_id, address = await self._dialback_receive.receive()
            try:
                await self._dial_back(node_id, address)
            finally:
                self._dialbacks.discard(node_id)

    async def _dial_back(self, node_id: NodeId, address: NodeAddress) -> None:
        """Dial the unconfirmed ``node_id``, whose connection ended, at the
        address that connection came from (Polykey's nodes advertise none),
        by a new connection from our socket, under its attempt deadline: if
        that verifies it, it is confirmed and stays, as a node we dialled
        does; if not, it leaves the graph (unless it connected again
        meanwhile: then it is unconfirmed still, and its next disconnect
        tells).

        What it proves: a node holding that NodeId's key answers new
        connections at that address, so it is no client gone quiet nor a
        client-only socket. What not: that others can reach it. Our dial
        leaves the socket the node's connection goes to, so behind a NAT
        whose mapping and filter that connection opened for our address
        it succeeds as well, while a third node's dial may be filtered.
        Telling those apart takes a dial from another port or another node,
        which one shared socket and Polykey's protocol do not offer; such a
        node is found out when others fail to reach it (``max_failures``).
        """
        if node_id not in self._unconfirmed or node_id not in self.graph:
            # Confirmed meanwhile (we dialled it), or gone.
            self._stats.dialbacks_skipped += 1
            return
        timeout = self.attempt_deadline(node_id)
        started = trio.current_time()
        # True: reached; None: not tried (a dial to it in flight); False:
        # failed, for ``failure``.
        reached: bool | None = False
        failure = f"no answer in {timeout:g} s"
        with trio.move_on_after(timeout):
            try:
                reached = await self.transport.dial_back(node_id, address) or None
            except Exception as exc:
                failure = str(exc) or type(exc).__name__
                self._transport_error("dial-back", node_id, exc)
        where = format_host_port(address.host, address.port)
        if reached is None:
            # A dial of ours: it confirms the node if it connects (then it
            # comes back to the graph), as it would have had it not left.
            self._stats.dialbacks_skipped += 1
        else:
            self._stats.dialbacks += 1
        if reached:
            self._note_attempt(trio.current_time() - started)
            self._stats.confirmed_by_dialback += 1
            self._unconfirmed.discard(node_id)
            self.note_contact(node_id, address)
            log.info("%s confirmed by a dial-back to %s", node_id, where)
            return
        if reached is False:
            self._stats.dialback_failed += 1
            log.debug("%s not confirmed: dial-back to %s: %s", node_id, where, failure)
        if node_id not in self._connected:
            self._remove_unconfirmed(node_id)

    def _queue(
        self, index: int, node_id: NodeId, addrs: tuple[NodeAddress, ...]
    ) -> None:
        bucket = self._pending.get(index)
        if bucket is None or node_id not in bucket:
            if self._pending_count >= self.config.max_pending:
                self._stats.pending_dropped += 1
                return
            self._pending_count += 1
        self._pending.setdefault(index, {})[node_id] = addrs
        self._wake_evictor.set()

    def _seen(self, contact: NodeContact) -> None:
        if not self.graph.touch(contact.node_id, self._clock()):
            self._note(contact)

    def _note(self, contact: NodeContact) -> None:
        result = self.graph.add_contact(contact, self._clock())
        if result.status == "full":
            self._queue(result.bucket, contact.node_id, contact.addresses)

    def note_unreachable(self, node_id: NodeId, began: float | None = None) -> None:
        """An attempt to reach ``node_id`` failed (a query, a ping, or the
        finder's dial): its next deadline doubles, and after
        ``max_failures`` in a row it leaves the graph. ``began``: when the
        attempt began (trio time); attempts that overlap count once (see
        :meth:`NodeGraph.mark_failed`): a node must fail that many tries
        one after another, not three lookups' queries caught by one stall."""
        failures = self.graph.mark_failed(node_id, now=trio.current_time(), began=began)
        if failures >= self.config.max_failures:
            self.graph.remove(node_id)
            self._stats.removed_failing += 1
            log.info(
                "%s left the graph: failed %d times", node_id, self.config.max_failures
            )

    async def add_node(
        self, node_id: NodeId, addresses: NodeAddress | Iterable[NodeAddress]
    ) -> bool:
        """Add ``node_id`` now, pinging and evicting if its bucket is full.

        Returns whether it is in the graph afterwards.
        """
        if node_id == self.own_id:
            raise OwnNodeIdError("a node's own NodeId is not a contact")
        addrs = (addresses,) if isinstance(addresses, NodeAddress) else tuple(addresses)
        result = self.graph.add(
            node_id, addrs, self._clock(), ping_batch=self.config.ping_batch
        )
        if result.status == "full":
            await self._make_room(result.bucket, {node_id: addrs})
        await self.writer.durable()  # acknowledged: on disk
        return node_id in self.graph

    async def graph_durable(self) -> None:
        """Return once every graph change made so far is on disk."""
        await self.writer.durable()

    async def _make_room(
        self, index: int, newcomers: dict[NodeId, tuple[NodeAddress, ...]]
    ) -> None:
        newcomers = {n: a for n, a in newcomers.items() if n not in self.graph}
        if not newcomers:
            return
        if self.graph.is_full(index):
            members = [
                m
                for m in self.graph.least_recently_seen(index, self.config.ping_batch)
                if not self._fresh(m.node_id)
            ]
            alive = await self._ping_many(members)
            # One missed deadline is not death (the member, or our own loop,
            # may be loaded): who missed it gets one more, backed off, before
            # a live node that Kademlia prefers is given up for a newcomer.
            missed = [i for i, ok in enumerate(alive) if not ok]
            again = await self._ping_many([members[i] for i in missed], backoff=1)
            for i, ok in zip(missed, again, strict=True):
                alive[i] = ok
            for member, ok in zip(members, alive, strict=True):
                if ok:
                    self.graph.touch(member.node_id, self._clock())
                elif self.graph.remove(member.node_id):
                    self._stats.evictions += 1
                    log.info("%s left the graph: evicted (no answer)", member.node_id)
        now = self._clock()
        for node_id, addrs in newcomers.items():
            if self.graph.is_full(index):
                self._stats.newcomers_dropped += 1
                continue
            self.graph.add(node_id, addrs, now)

    def _fresh(self, node_id: NodeId) -> bool:
        seen = self.graph.last_seen(node_id)
        if seen is None or self.graph.failures(node_id):
            return False
        return self._clock() - seen < self.config.fresh_interval

    async def _ping_many(
        self,
        contacts: Sequence[NodeContact],
        why: dict[NodeId, str] | None = None,
        *,
        backoff: int = 0,
    ) -> list[bool]:
        results = [False] * len(contacts)

        async def one(i: int, contact: NodeContact) -> None:
            results[i] = await self._ping_once(
                contact.node_id, contact.addresses, why, backoff=backoff
            )

        async with trio.open_nursery() as nursery:
            for i, contact in enumerate(contacts):
                nursery.start_soon(one, i, contact)
        return results

    async def _ping_once(
        self,
        node_id: NodeId,
        addresses: Sequence[NodeAddress],
        why: dict[NodeId, str] | None = None,
        *,
        backoff: int = 0,
    ) -> bool:
        """Ping ``node_id``; when it fails and ``why`` is given, record why.
        ``backoff``: failures to count beyond the graph's for the deadline."""
        self._stats.pings += 1
        ok = False
        reason = "unreachable"
        timeout = self.attempt_deadline(node_id, backoff=backoff)
        started = trio.current_time()
        with trio.move_on_after(timeout) as scope:
            try:
                ok = bool(await self.transport.ping(node_id, addresses))
                if ok:
                    self._note_attempt(trio.current_time() - started)
            except Exception as exc:
                self._transport_error("ping", node_id, exc)
                reason = str(exc) or type(exc).__name__
        if scope.cancelled_caught:
            reason = f"no answer in {timeout:g} s"
        if not ok:
            self._stats.ping_failures += 1
            if why is not None:
                why[node_id] = reason
        return ok

    def attempt_deadline(
        self, node_id: NodeId | None = None, backoff: int = 0
    ) -> float:
        """Seconds one ping or query (to ``node_id``) may take: longer for
        a node that failed last time (see :mod:`~polykey.nodes._attempts`)."""
        ceiling = self.config.query_timeout
        if self._attempts is None:
            return ceiling
        failures = backoff
        if node_id is not None:
            failures += self.graph.failures(node_id)
        return self._attempts.timeout(ceiling, failures)

    def _note_attempt(self, seconds: float) -> None:
        if self._attempts is not None:
            self._attempts.note(seconds)

    def _transport_error(self, what: str, node_id: NodeId, exc: BaseException) -> None:
        # A peer's failure is routine; it must never take the node down.
        # Neither may a bug of ours in one attempt, but it is told.
        self._stats.transport_errors += 1
        if not note_failure(log, what, node_id, exc):
            self._stats.unexpected_errors += 1

    async def ping(
        self, node_id: NodeId, addresses: Sequence[NodeAddress] | None = None
    ) -> bool:
        """Ping ``node_id`` (at its known addresses by default) and record
        the outcome in the graph."""
        if node_id == self.own_id:
            raise OwnNodeIdError("a node does not ping itself")
        if addresses is None:
            known = self.graph.get(node_id)
            addresses = known.addresses if known is not None else ()
        if not addresses:
            return False
        began = trio.current_time()
        ok = await self._ping_once(node_id, addresses)
        if ok:
            self._seen(NodeContact(node_id, addresses))
        else:
            self.note_unreachable(node_id, began)
        return ok

    def closest_local(
        self, target: NodeId, limit: int | None = None
    ) -> list[NodeContact]:
        """What ``nodesClosestLocalNodesGet`` answers: our closest nodes to
        ``target`` that have not recently failed."""
        return self.graph.closest(target, limit, exclude_failed=True)

    # -- lookups ---------------------------------------------------------------

    async def lookup(self, target: NodeId, *, find: bool = False) -> LookupResult:
        """Iterative lookup for ``target``: the k closest live nodes (and, in
        find mode, the target itself as soon as it answers)."""
        cfg = self.config
        machine = Lookup(
            self.own_id,
            target,
            # More than the k closest: should those all be dead, the lookup
            # goes on with the next of our own (it has no other source).
            self.graph.closest(target, self.graph.k + cfg.max_contacted),
            k=self.graph.k,
            alpha=cfg.alpha,
            max_contacted=cfg.max_contacted,
            find=find,
        )
        self.running_lookups.append(machine)
        try:
            with trio.move_on_after(cfg.lookup_timeout) as scope:
                async with trio.open_nursery() as nursery:
                    self._pump(machine, nursery)
        finally:
            self.running_lookups.remove(machine)
        self._stats.lookups += 1
        self._stats.lookup_rounds += machine.rounds
        self._stats.ignored_entries += machine.ignored
        if scope.cancelled_caught:
            self._stats.lookups_timed_out += 1
        if target != self.own_id:
            self.schedule.bucket_refreshed(
                self.graph.bucket_index(target), trio.current_time()
            )
        return LookupResult(
            target=target,
            contacts=tuple(machine.result()),
            found=machine.found,
            rounds=machine.rounds,
            found_round=machine.found_round,
            learned_round=machine.learned_round,
            queries=machine.contacted,
            failures=machine.failures,
            timed_out=scope.cancelled_caught,
        )

    def _pump(self, machine: Lookup, nursery: trio.Nursery) -> None:
        if machine.found is not None:
            # The first success settles a find: stop the other queries.
            nursery.cancel_scope.cancel()
            return
        for contact in machine.next_queries():
            nursery.start_soon(self._query, machine, nursery, contact)

    async def _query(
        self, machine: Lookup, nursery: trio.Nursery, contact: NodeContact
    ) -> None:
        self._stats.queries += 1
        answer: Sequence[NodeContact] | None = None
        started = trio.current_time()
        # A find asks its target once more (the Lookup's rule), backed off,
        # when the first ask timed out and nothing had failed to reach it
        # before: one slow answer (a loaded peer) must not lose the find,
        # and a target known to be failing costs no second deadline.
        failed_before = self.graph.failures(contact.node_id)
        with trio.move_on_after(self.attempt_deadline(contact.node_id)) as scope:
            try:
                found = await self.transport.closest_nodes(
                    contact.node_id, contact.addresses, machine.target
                )
                # Whatever the transport returns, hold at most k + 1 of it.
                answer = list(itertools.islice(found, self.graph.k + 1))
                self._note_attempt(trio.current_time() - started)
            except Exception as exc:
                self._transport_error("query", contact.node_id, exc)
        if answer is None:
            self._stats.query_failures += 1
            retry = scope.cancelled_caught and not failed_before
            machine.on_failure(contact.node_id, retry=retry)
            self.note_unreachable(contact.node_id, started)
        else:
            machine.on_response(contact.node_id, answer)
            self._seen(contact)
        self._pump(machine, nursery)

    async def find(self, node_id: NodeId) -> LookupResult:
        """Look for ``node_id`` (a find-mode lookup, counted as a find);
        ``result.found`` is its contact, or None."""
        if node_id == self.own_id:
            raise OwnNodeIdError("a node does not look itself up by find_node")
        self._stats.finds += 1
        result = await self.lookup(node_id, find=True)
        if result.found is None:
            self._stats.finds_failed += 1
        return result

    async def find_node(self, node_id: NodeId) -> NodeContact:
        """Find ``node_id`` in the network; raises NodeNotFoundError."""
        result = await self.find(node_id)
        if result.found is None:
            raise NodeNotFoundError(
                node_id, f"{result.queries} nodes asked, {result.failures} failed"
            )
        return result.found

    async def refresh_bucket(self, index: int) -> LookupResult:
        """Look up a random NodeId in bucket ``index``."""
        self._stats.refreshes += 1
        target = self.graph.random_node_id_in_bucket(index, self._rng)
        return await self.lookup(target)

    async def join(self, seeds: Iterable[NodeContact]) -> JoinResult:
        """Join the network through ``seeds`` (see the module doc)."""
        seeds = [s for s in seeds if s.node_id != self.own_id and s.addresses]
        now = self._clock()
        for seed in seeds:
            self.graph.add(seed.node_id, seed.addresses, now)
        t = self.own_id.to_int()
        closest = sorted(seeds, key=lambda s: s.node_id.to_int() ^ t)[
            : self.config.seed_connect
        ]
        why: dict[NodeId, str] = {}
        began = trio.current_time()
        alive = await self._ping_many(closest, why)
        for seed, ok in zip(closest, alive, strict=True):
            if ok:
                self._seen(seed)
            else:
                log.info(
                    "seed %s at %s not reached: %s",
                    seed.node_id,
                    ", ".join(format_host_port(a.host, a.port) for a in seed.addresses),
                    why.get(seed.node_id, "unreachable"),
                )
                self.note_unreachable(seed.node_id, began)
        self_lookup = await self._self_lookup()
        refreshed: list[int] = []
        nonempty = self.graph.nonempty_buckets()
        if nonempty:
            for index in range(nonempty[-1], nonempty[0], -1):
                await self.refresh_bucket(index)
                refreshed.append(index)
        return JoinResult(sum(alive), self_lookup, tuple(refreshed))

    async def _self_lookup(self) -> LookupResult:
        self._stats.self_lookups += 1
        result = await self.lookup(self.own_id)
        self.schedule.self_lookup_done(trio.current_time())
        return result

    def statistics(self) -> NodeManagerStatistics:
        self._stats.pending = self._pending_count
        return attrs.evolve(self._stats)
