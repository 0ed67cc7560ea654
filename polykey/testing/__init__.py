"""Helpers for testing code built on polykey (and for polykey's own tests).

- :class:`SimulatedNetwork`: many nodes (graph, manager, RPC handlers) in one
  process under trio's MockClock, joined by in-memory transports, with
  failure injection. See docs/nodes.md.
- :class:`Nat`, :class:`NatType`, :class:`NatBehaviour`: NAT models
  (RFC 4787 mapping and filtering, conntrack's timeouts), pure.
- :class:`NatNetwork`: nodes with the real graph, manager, handlers and
  :class:`~polykey.nodes.NodeFinder` behind those NATs, connecting by
  simulated dials, punches and relays, under MockClock. See docs/testing.md.
- :class:`LossyUDPRelay`: a seeded UDP relay on real sockets that drops,
  duplicates, delays and reorders datagrams, or black-holes a peer.
- :class:`SchedulerCounter`: counts trio task steps and scheduler rounds,
  and :class:`PythonCallCounter` Python function calls, for regression
  guards counted in events rather than timed.
- :func:`memory_stream_pair`: two connected in-memory half-closeable streams
  with QUIC-like reset codes (from :mod:`polykey.rpc`), for RPC tests.
"""

from __future__ import annotations

from ..rpc import MemoryStream, memory_stream_pair
from ._counting import PythonCallCounter, SchedulerCounter
from ._nat import (
    Filtering,
    Mapping,
    MappingView,
    Nat,
    NatBehaviour,
    NatStatistics,
    NatType,
)
from ._natnet import NatNetwork, NatNetworkStatistics, NatNode
from ._network import NetworkStatistics, SimNode, SimulatedNetwork, Unreachable
from ._simconn import SimConnections
from ._simlink import SimLink
from ._udp_relay import LossyUDPRelay, RelayStatistics

__all__ = [
    "Filtering",
    "LossyUDPRelay",
    "Mapping",
    "MappingView",
    "MemoryStream",
    "Nat",
    "NatBehaviour",
    "NatNetwork",
    "NatNetworkStatistics",
    "NatNode",
    "NatStatistics",
    "NatType",
    "NetworkStatistics",
    "PythonCallCounter",
    "RelayStatistics",
    "SchedulerCounter",
    "SimConnections",
    "SimLink",
    "SimNode",
    "SimulatedNetwork",
    "Unreachable",
    "memory_stream_pair",
]
