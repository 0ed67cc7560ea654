"""Helpers for testing code built on polykey (and for polykey's own tests).

- :class:`LossyUDPRelay`: a seeded UDP relay on real sockets that drops,
  duplicates, delays and reorders datagrams, or black-holes a peer.
"""

from __future__ import annotations

from ._udp_relay import LossyUDPRelay, RelayStatistics

__all__ = ["LossyUDPRelay", "RelayStatistics"]
