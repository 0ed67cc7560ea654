"""The iterative Kademlia lookup, as a pure state machine (no trio).

Theory of operation
-------------------
A :class:`Lookup` keeps candidates sorted by XOR distance to the target,
each NEW, WAITING (queried), RESPONDED or FAILED. :meth:`Lookup.next_queries`
hands out the closest NEW candidates among the ``k`` closest that have not
failed, keeping at most ``alpha`` (3) queries in flight and at most
``max_contacted`` (20, as Polykey's findNode) queries in all. The driver
sends each query and reports back with :meth:`on_response` or
:meth:`on_failure`, then asks again; the machine never does I/O and never
reads a clock.

It is :attr:`done` when, with nothing in flight, none of the ``k`` closest
live candidates is left to ask, or the budget is spent. In ``find`` mode it
is also done the moment the target itself answers: the target is at
distance 0, so it is queried as soon as anyone names it, and a transport
that verifies identities (QUIC does) proves that it is the real one.
:meth:`result` is the ``k`` closest nodes that responded.

Peers' answers are untrusted: only the first ``max_response`` contacts of a
response are read; anything that is not a :class:`NodeContact`, has no
address, is our own NodeId, or is already a candidate is ignored (counted in
:attr:`ignored`). Unverified contacts never reach the node graph: only nodes
that answer a query are reported to it (by the driver). A contact for the
target that failed may be retried once per new address set, at most twice;
and in ``find`` mode once more when the driver says its failure may pass
(``on_failure(retry=True)``: the manager says so of a first timeout, and
backs off the retry's deadline). That second ask is beyond the
``max_contacted`` budget: it is the same query again, and a lookup that had
spent its budget reaching the target must not end one ask short of it.

Rounds: a candidate from the local graph has depth 0, one first named in
the answer to a round-``r`` query has depth ``r``; querying a depth-``d``
candidate is a round-``d + 1`` query. :attr:`rounds` is the deepest round
queried, :attr:`found_round` the round of the query that reached the
target, :attr:`learned_round` the round whose answer first named it (0 if
it was already known).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from typing import Final

import attrs

from ..keys import NodeId
from ._address import NodeContact

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MAX_CONTACTED",
    "Lookup",
]

DEFAULT_ALPHA: Final = 3
DEFAULT_MAX_CONTACTED: Final = 20
_MAX_TARGET_RETRIES: Final = 2


class _State(enum.IntEnum):
    NEW = 0
    WAITING = 1
    RESPONDED = 2
    FAILED = 3


@attrs.define(slots=True, eq=False)
class _Candidate:
    contact: NodeContact
    distance: int
    depth: int
    state: _State = _State.NEW


class Lookup:
    """One lookup for ``target`` by the node ``own_id``.

    ``initial``: contacts to start from (the local graph's closest). ``find``:
    stop as soon as the target itself answers.
    """

    def __init__(
        self,
        own_id: NodeId,
        target: NodeId,
        initial: Iterable[NodeContact],
        *,
        k: int = 20,
        alpha: int = DEFAULT_ALPHA,
        max_contacted: int = DEFAULT_MAX_CONTACTED,
        find: bool = False,
        max_response: int | None = None,
        max_candidates: int | None = None,
    ) -> None:
        if k < 1 or alpha < 1 or max_contacted < 1:
            raise ValueError("k, alpha and max_contacted must be >= 1")
        self.own_id = own_id
        self.target = target
        self.k = k
        self.alpha = alpha
        self.max_contacted = max_contacted
        self.find = find
        self.max_response = k if max_response is None else max_response
        # Enough to refill the k closest after every queried node failed.
        self.max_candidates = (
            k + max_contacted + self.max_response
            if max_candidates is None
            else max_candidates
        )
        self._t = int.from_bytes(target.raw, "big")
        self._own_raw = own_id.raw
        self._target_raw = target.raw
        # Keyed by raw id: C-level hashing in the hot path.
        self._by_id: dict[bytes, _Candidate] = {}
        # Sorted by (distance, tie) for selection; distances are unique per id.
        self._order: list[_Candidate] = []
        self._target_retries = 0
        # max_contacted, plus one once the target's second ask is granted.
        self._budget = max_contacted
        self.in_flight = 0
        self.contacted = 0
        self.responses = 0
        self.failures = 0
        self.ignored = 0
        self.rounds = 0
        self.found: NodeContact | None = None
        self.found_round: int | None = None
        self.learned_round: int | None = None
        for contact in initial:
            self._add(contact, 0)

    # -- candidates -----------------------------------------------------------

    def _add(self, contact: object, depth: int) -> bool:
        if not isinstance(contact, NodeContact):
            self.ignored += 1
            return False
        raw = contact.node_id.raw
        if raw == self._own_raw or not contact.addresses:
            self.ignored += 1
            return False
        existing = self._by_id.get(raw)
        if existing is not None:
            if (
                raw == self._target_raw
                and existing.state is _State.FAILED
                and self._target_retries < _MAX_TARGET_RETRIES
                and not set(contact.addresses) <= set(existing.contact.addresses)
            ):
                # Someone knows another address for the target: try it.
                self._target_retries += 1
                existing.contact = contact
                existing.depth = depth
                existing.state = _State.NEW
                return True
            self.ignored += 1
            return False
        distance = int.from_bytes(raw, "big") ^ self._t
        candidate = _Candidate(contact, distance, depth)
        self._by_id[raw] = candidate
        bisect.insort(self._order, candidate, key=_distance)
        if distance == 0 and self.learned_round is None:
            self.learned_round = depth
        if len(self._order) > self.max_candidates:
            self._trim()
        return True

    def _trim(self) -> None:
        # Drop the farthest NEW candidates; never forget one we asked.
        for i in range(len(self._order) - 1, -1, -1):
            if len(self._order) <= self.max_candidates:
                return
            candidate = self._order[i]
            if candidate.state is _State.NEW:
                del self._order[i]
                del self._by_id[candidate.contact.node_id.raw]

    def _eligible(self) -> list[_Candidate]:
        """NEW candidates among the k closest that have not failed."""
        out: list[_Candidate] = []
        live = 0
        for candidate in self._order:
            if candidate.state is _State.FAILED:
                continue
            if candidate.state is _State.NEW:
                out.append(candidate)
            live += 1
            if live >= self.k:
                break
        return out

    # -- driving --------------------------------------------------------------

    @property
    def done(self) -> bool:
        if self.found is not None:
            return True
        if self.in_flight:
            return False
        return self.contacted >= self._budget or not self._eligible()

    def next_queries(self) -> list[NodeContact]:
        """Contacts to query now (marked WAITING); empty when none may start."""
        if self.found is not None:
            return []
        room = min(self.alpha - self.in_flight, self._budget - self.contacted)
        if room <= 0:
            return []
        out: list[NodeContact] = []
        for candidate in self._eligible()[:room]:
            candidate.state = _State.WAITING
            self.in_flight += 1
            self.contacted += 1
            self.rounds = max(self.rounds, candidate.depth + 1)
            out.append(candidate.contact)
        return out

    def _waiting(self, node_id: NodeId) -> _Candidate | None:
        candidate = self._by_id.get(node_id.raw)
        if candidate is None or candidate.state is not _State.WAITING:
            return None
        return candidate

    def on_response(self, node_id: NodeId, contacts: Iterable[object]) -> None:
        """``node_id`` answered with ``contacts`` (untrusted, capped here)."""
        candidate = self._waiting(node_id)
        if candidate is None:
            return
        candidate.state = _State.RESPONDED
        self.in_flight -= 1
        self.responses += 1
        depth = candidate.depth + 1
        if self.find and candidate.distance == 0 and self.found is None:
            self.found = candidate.contact
            self.found_round = depth
        # A peer naming itself is ignored by _add: it is already a candidate.
        by_id = self._by_id
        for taken, contact in enumerate(contacts):
            if taken >= self.max_response:
                self.ignored += 1
                break
            # Hot path (most answers repeat known nodes): a known id is skipped
            # before any other work. ``_raw`` is NodeId's slot: no property call.
            if (
                type(contact) is NodeContact
                and contact.node_id._raw in by_id
                and contact.node_id._raw != self._target_raw
            ):
                self.ignored += 1
                continue
            self._add(contact, depth)

    def on_failure(self, node_id: NodeId, *, retry: bool = False) -> None:
        """``node_id`` did not answer (unreachable, timed out, bad reply).
        ``retry``: in find mode, ask the target once more (once a lookup)."""
        candidate = self._waiting(node_id)
        if candidate is None:
            return
        self.in_flight -= 1
        self.failures += 1
        if (
            retry
            and self.find
            and candidate.distance == 0
            and self._budget == self.max_contacted  # not granted yet
        ):
            self._budget += 1
            candidate.state = _State.NEW
            return
        candidate.state = _State.FAILED

    # -- results --------------------------------------------------------------

    def result(self) -> list[NodeContact]:
        """The k closest nodes that responded, closest first."""
        out: list[NodeContact] = []
        for candidate in self._order:
            if candidate.state is _State.RESPONDED:
                out.append(candidate.contact)
                if len(out) >= self.k:
                    break
        return out

    def is_failed(self, node_id: NodeId) -> bool:
        candidate = self._by_id.get(node_id.raw)
        return candidate is not None and candidate.state is _State.FAILED

    def __repr__(self) -> str:
        return (
            f"<Lookup target={self.target} find={self.find} contacted={self.contacted} "
            f"in_flight={self.in_flight} responses={self.responses} "
            f"failures={self.failures} done={self.done}>"
        )


def _distance(candidate: _Candidate) -> int:
    return candidate.distance
