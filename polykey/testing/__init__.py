"""Helpers for testing code built on polykey (and for polykey's own tests).

- :class:`SimulatedNetwork`: many nodes (graph, manager, RPC handlers) in one
  process under trio's MockClock, joined by in-memory transports, with
  failure injection. See docs/nodes.md.
- :class:`LossyUDPRelay`: a seeded UDP relay on real sockets that drops,
  duplicates, delays and reorders datagrams, or black-holes a peer.
- :func:`memory_stream_pair`: two connected in-memory half-closeable streams
  with QUIC-like reset codes (from :mod:`polykey.rpc`), for RPC tests.
"""

from __future__ import annotations

from ..rpc import MemoryStream, memory_stream_pair
from ._network import NetworkStatistics, SimNode, SimulatedNetwork, Unreachable
from ._udp_relay import LossyUDPRelay, RelayStatistics

__all__ = [
    "LossyUDPRelay",
    "MemoryStream",
    "NetworkStatistics",
    "RelayStatistics",
    "SimNode",
    "SimulatedNetwork",
    "Unreachable",
    "memory_stream_pair",
]
