"""Who may hold a connection on a server: pure bookkeeping, time an argument.

A remote "address" here is what one party can hold many of cheaply: an IPv4
address, or an IPv6 /64 (a host is routinely given a whole /64, so counting
single IPv6 addresses would let it take a limit's worth per address). IPv4
peers of a dual-stack socket arrive as ``::ffff:a.b.c.d`` and count as IPv4.
"""

from __future__ import annotations

import collections
import enum
import ipaddress

import attrs

__all__ = ["Admission", "AdmissionLimits", "Refusal", "address_key"]


def address_key(host: str) -> str:
    """The party behind ``host``: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Refusal(enum.Enum):
    """Why a new client was not given a connection."""

    CONNECTIONS = "connections"
    CONNECTIONS_PER_ADDRESS = "connections_per_address"
    HANDSHAKE_RATE = "handshake_rate"


@attrs.frozen(kw_only=True)
class AdmissionLimits:
    """None: no limit."""

    max_connections: int | None = None
    max_connections_per_address: int | None = None
    #: New handshakes per second per address, and the burst allowed.
    handshake_rate: float | None = None
    handshake_burst: int = 1


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class Admission:
    """Connections held (handshaking or verified) in all and per address,
    and a token bucket of new handshakes per address.

    Buckets are kept only while they are not full (a full one is the same
    as none), so their number is bounded by the addresses that started a
    handshake in the last ``burst / rate`` seconds; past ``max_buckets``
    the oldest is dropped.
    """

    def __init__(self, limits: AdmissionLimits, *, max_buckets: int = 65_536) -> None:
        self.limits = limits
        self.max_buckets = max_buckets
        self.connections = 0
        self._per_address: collections.Counter[str] = collections.Counter()
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def held(self, key: str) -> int:
        return self._per_address[key]

    def admit(self, key: str, now: float) -> Refusal | None:
        """Whether a new connection from ``key`` may start now; when it may,
        it is counted (call :meth:`release` when it ends)."""
        limits = self.limits
        if limits.max_connections is not None and (
            self.connections >= limits.max_connections
        ):
            return Refusal.CONNECTIONS
        per_address = limits.max_connections_per_address
        if per_address is not None and self._per_address[key] >= per_address:
            return Refusal.CONNECTIONS_PER_ADDRESS
        if limits.handshake_rate is not None and not self._take(key, now):
            return Refusal.HANDSHAKE_RATE
        self.connections += 1
        self._per_address[key] += 1
        return None

    def release(self, key: str) -> None:
        self.connections -= 1
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]

    def _take(self, key: str, now: float) -> bool:
        rate = self.limits.handshake_rate
        assert rate is not None
        burst = float(self.limits.handshake_burst)
        buckets = self._buckets
        # Forget buckets that have refilled: they are the default again.
        while buckets:
            oldest, bucket = next(iter(buckets.items()))
            if bucket.tokens + (now - bucket.updated) * rate < burst:
                break
            del buckets[oldest]
        bucket = buckets.pop(key) if key in buckets else _Bucket(burst, now)
        bucket.tokens = min(
            burst, bucket.tokens + max(0.0, now - bucket.updated) * rate
        )
        bucket.updated = now
        if bucket.tokens < 1:
            buckets[key] = bucket
            return False
        bucket.tokens -= 1
        buckets[key] = bucket
        while len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
        return True
