"""Datagram routes: packets of one connection carried in another's DATAGRAM
frames, routed in C.

Theory of operation
-------------------
A relayed connection's packets travel as DATAGRAM frames ``prefix ||
packet`` of the connections its ends hold to the relay (the prefix names the
circuit). Handled in Python, each frame costs a few microseconds at each of
the three nodes, which at bulk rates is the whole of a core. So a *carrier*
(a connection whose datagrams carry other connections' packets) has a table
of routes by prefix, and what quiche has received is drained through it in
one C call per wake-up (``pk_conn_dgram_route`` in the shim):

* a **forward** (a relay) swaps the prefix and queues the frame on another
  connection, within a byte budget;
* a **delivery** (an end) feeds a short-header packet for the inner
  connection's id straight to that connection, as received from its virtual
  path.

A frame no route takes (a handshake packet, an empty frame, one past the
budget, one for a connection id not seen yet) goes to the carrier's
``on_datagram`` handler, as every frame did before the routes. After each C
call :meth:`CarrierRoutes.settle` turns the routes' counters into what
Python tracks: inner connections that were fed are marked for processing,
targets of forwards are flushed, and each forward's owner hears what it
carried (a relay's accounting), before the next frame reaches the handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _binding

if TYPE_CHECKING:
    from ._connection import QUICConnection

__all__ = ["CarrierRoutes", "DatagramForward"]

#: ``on_forwarded(datagrams, payload_bytes, dropped)``.
ForwardCallback = Callable[[int, int, int], None]


class _Entry:
    __slots__ = ("route", "seen")

    def __init__(self, route: _binding.DatagramRoute) -> None:
        self.route = route
        self.seen = (0, 0, 0)

    def settled(self, datagrams: int, size: int, dropped: int) -> None:
        raise NotImplementedError


class DatagramForward(_Entry):
    """Datagrams of a carrier starting with one prefix go to ``target``'s
    datagrams with another, in C, at most :attr:`budget` payload bytes; made
    by :meth:`QUICConnection.forward_datagrams`. A datagram past the budget
    goes to the carrier's ``on_datagram`` handler instead."""

    __slots__ = ("_on_forwarded", "_routes", "target")

    def __init__(
        self,
        routes: CarrierRoutes,
        route: _binding.DatagramRoute,
        target: QUICConnection,
        on_forwarded: ForwardCallback | None,
    ) -> None:
        super().__init__(route)
        self._routes: CarrierRoutes | None = routes
        self.target = target
        self._on_forwarded = on_forwarded

    @property
    def budget(self) -> int:
        """Payload bytes it may still forward."""
        return self.route.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.route.budget = value

    @property
    def closed(self) -> bool:
        return self._routes is None

    def counters(self) -> tuple[int, int, int]:
        """Datagrams forwarded, their payload bytes, and of them dropped
        (the target's queue was full): totals."""
        return self.route.counters()

    def close(self) -> None:
        """Stop forwarding (idempotent); later datagrams go to the handler."""
        routes, self._routes = self._routes, None
        if routes is not None:
            routes.remove(self)

    def settled(self, datagrams: int, size: int, dropped: int) -> None:
        if datagrams > dropped:
            target = self.target
            target.flush_later()
        if self._on_forwarded is not None:
            self._on_forwarded(datagrams, size, dropped)


class _Delivery(_Entry):
    __slots__ = ("inner",)

    def __init__(self, route: _binding.DatagramRoute, inner: QUICConnection) -> None:
        super().__init__(route)
        self.inner = inner

    def settled(self, datagrams: int, size: int, dropped: int) -> None:
        inner = self.inner
        inner.datagrams_carried(datagrams)


class CarrierRoutes:
    """The routes of one carrier connection's datagrams."""

    def __init__(self, prefix_len: int) -> None:
        self.table = _binding.DatagramRoutes(prefix_len)
        self._entries: list[_Entry] = []

    def forward(
        self,
        prefix: bytes,
        target: QUICConnection,
        target_prefix: bytes,
        budget: int,
        on_forwarded: ForwardCallback | None,
    ) -> DatagramForward:
        route = _binding.DatagramRoute.forward(
            prefix, target.quiche, target_prefix, budget
        )
        entry = DatagramForward(self, route, target, on_forwarded)
        self._add(entry)
        return entry

    def deliver(self, prefix: bytes, inner: QUICConnection, dcid: bytes) -> None:
        """Feed short-header packets for ``dcid`` after ``prefix`` to
        ``inner`` (replacing what the prefix was delivered to before)."""
        for entry in self._entries:
            if entry.route.prefix == prefix and isinstance(entry, _Delivery):
                if entry.inner is inner:
                    entry.route.dcid = dcid
                    return
                self.remove(entry)
                break
        route = _binding.DatagramRoute.deliver(prefix, inner.quiche, dcid)
        self._add(_Delivery(route, inner))

    def undeliver(self, prefix: bytes) -> None:
        for entry in self._entries:
            if entry.route.prefix == prefix and isinstance(entry, _Delivery):
                self.remove(entry)
                return

    def _add(self, entry: _Entry) -> None:
        self.table.add(entry.route)
        self._entries.append(entry)

    def remove(self, entry: _Entry) -> None:
        # Counters are settled after every C call: nothing is left to report.
        if entry in self._entries:
            self._entries.remove(entry)
            self.table.remove(entry.route)

    def settle(self) -> None:
        """Report what the routes took since the last call."""
        for entry in list(self._entries):
            self.settle_one(entry)

    @staticmethod
    def settle_one(entry: _Entry) -> None:
        now = entry.route.counters()
        seen = entry.seen
        if now != seen:
            entry.seen = now
            entry.settled(now[0] - seen[0], now[1] - seen[1], now[2] - seen[2])
