"""NAT models for simulations: RFC 4787 mapping and filtering, pure.

A :class:`Nat` translates UDP between hosts behind it (internal endpoints)
and the internet (its one external IP):

* **Mapping** (RFC 4787 section 4.1): which external port an internal
  endpoint's packets leave from. Endpoint-independent: one port for every
  destination (the internal port when it is free, as Linux MASQUERADE
  keeps it); address-dependent: one per destination IP;
  address-and-port-dependent: a new random port for every destination
  (MASQUERADE ``--random-fully``, a "symmetric" NAT).
* **Filtering** (section 5): which inbound packets to a mapped port are let
  in. Endpoint-independent: from anywhere; address-dependent: from an IP
  the mapping has sent to; address-and-port-dependent: only from an
  endpoint it has sent to (what Linux conntrack does).

State is per flow (mapping, remote endpoint), as conntrack keeps it: a flow
that has seen one direction expires ``unreplied_timeout`` (30 s) after its
last packet, one that has seen both ``established_timeout`` (120 s), the
kernel's UDP defaults. A mapping lives while one of its flows does. A reply
leaves through the mapping its flow belongs to, whatever the mapping
behaviour (conntrack's reply direction).

Pure: time is an argument (``now``, seconds; trio's clock in a
simulation, so virtual under MockClock), randomness is a seeded
:class:`random.Random`.

:class:`NatType` names the four types of tests/natlab's lab: NONE (no NAT),
FULL_CONE (endpoint-independent mapping and filtering), PORT_RESTRICTED
(endpoint-independent mapping, address-and-port-dependent filtering),
SYMMETRIC (address-and-port-dependent both). Other combinations, such as a
restricted cone (address-dependent filtering), are a :class:`NatBehaviour`.
"""

from __future__ import annotations

import enum
import random
from typing import Final

import attrs

from ..quic import Address

__all__ = [
    "Filtering",
    "Mapping",
    "MappingView",
    "Nat",
    "NatBehaviour",
    "NatStatistics",
    "NatType",
]

UNREPLIED_TIMEOUT: Final = 30.0
ESTABLISHED_TIMEOUT: Final = 120.0
#: External ports a NAT hands out (the IANA dynamic range and below, as
#: Linux does: everything above the well-known ports).
PORT_RANGE: Final = (1024, 65535)


class NatType(enum.Enum):
    NONE = "none"
    FULL_CONE = "full-cone"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"


class Mapping(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Filtering(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


@attrs.frozen
class NatBehaviour:
    mapping: Mapping
    filtering: Filtering

    @classmethod
    def of(cls, nat_type: NatType) -> NatBehaviour:
        """The behaviour of a lab NAT type (NONE has none: it is no NAT)."""
        if nat_type is NatType.NONE:
            raise ValueError("NatType.NONE is no NAT")
        return _BEHAVIOURS[nat_type]

    def key(self, remote: Address) -> object:
        """What one mapping of an internal endpoint is for."""
        if self.mapping is Mapping.ENDPOINT_INDEPENDENT:
            return None
        if self.mapping is Mapping.ADDRESS_DEPENDENT:
            return remote[0]
        return remote

    def allows(self, flow: Address, source: Address) -> bool:
        """Whether a mapping with a live flow to ``flow`` admits ``source``."""
        if self.filtering is Filtering.ENDPOINT_INDEPENDENT:
            return True
        if self.filtering is Filtering.ADDRESS_DEPENDENT:
            return flow[0] == source[0]
        return flow == source


_BEHAVIOURS: Final = {
    NatType.FULL_CONE: NatBehaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT
    ),
    NatType.PORT_RESTRICTED: NatBehaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT
    ),
    NatType.SYMMETRIC: NatBehaviour(
        Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT
    ),
}


@attrs.define
class _Flow:
    remote: Address
    expires: float
    outbound: bool = False
    inbound: bool = False


@attrs.define(eq=False)
class _Binding:
    internal: Address
    key: object
    port: int
    flows: dict[Address, _Flow] = attrs.Factory(dict)


@attrs.frozen
class MappingView:
    """One mapping as :meth:`Nat.mappings` shows it."""

    internal: Address
    external: Address
    #: Remote endpoint -> (both directions seen, expiry time).
    flows: dict[Address, tuple[bool, float]]


@attrs.define
class NatStatistics:
    #: Outbound packets translated.
    outbound: int = 0
    #: Mappings made.
    mappings: int = 0
    #: Inbound packets let in, and dropped (no mapping, or filtered).
    admitted: int = 0
    unmapped: int = 0
    filtered: int = 0


class Nat:
    """One NAT: ``outbound`` translates, ``inbound`` admits or drops."""

    def __init__(
        self,
        behaviour: NatBehaviour | NatType,
        external_ip: str,
        *,
        rng: random.Random | None = None,
        unreplied_timeout: float = UNREPLIED_TIMEOUT,
        established_timeout: float = ESTABLISHED_TIMEOUT,
        port_range: tuple[int, int] = PORT_RANGE,
    ) -> None:
        if isinstance(behaviour, NatType):
            behaviour = NatBehaviour.of(behaviour)
        low, high = port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {port_range}")
        self.behaviour = behaviour
        self.external_ip = external_ip
        self.unreplied_timeout = unreplied_timeout
        self.established_timeout = established_timeout
        self.port_range = port_range
        self.statistics = NatStatistics()
        self._rng = rng or random.Random(0)
        self._by_port: dict[int, _Binding] = {}
        self._by_key: dict[tuple[Address, object], _Binding] = {}
        # Where each (internal, remote) flow lives: replies use it.
        self._flow_of: dict[tuple[Address, Address], _Binding] = {}
        # No flow expires before this (a lower bound; see _expire).
        self._next_expiry = float("inf")

    def __repr__(self) -> str:
        b = self.behaviour
        return f"<Nat {b.mapping.value}/{b.filtering.value} {self.external_ip}>"

    # -- packets ---------------------------------------------------------------

    def outbound(self, internal: Address, remote: Address, now: float) -> Address:
        """A packet from ``internal`` to ``remote``: the external endpoint it
        leaves from (mapping it, or refreshing its mapping)."""
        self._expire(now)
        self.statistics.outbound += 1
        binding = self._flow_of.get((internal, remote))
        if binding is None:
            key = self.behaviour.key(remote)
            binding = self._by_key.get((internal, key))
            if binding is None:
                binding = self._map(internal, key)
        self._touch(binding, remote, now, outbound=True)
        return (self.external_ip, binding.port)

    def inbound(self, source: Address, port: int, now: float) -> Address | None:
        """A packet from ``source`` to our ``port``: the internal endpoint it
        is for, or None when it is dropped."""
        self._expire(now)
        binding = self._by_port.get(port)
        if binding is None:
            self.statistics.unmapped += 1
            return None
        if not any(self.behaviour.allows(r, source) for r in binding.flows):
            self.statistics.filtered += 1
            return None
        self.statistics.admitted += 1
        owner = self._flow_of.get((binding.internal, source))
        if owner is None or owner is binding:
            self._touch(binding, source, now, outbound=False)
        # Else that flow lives in another mapping (a filter looser than the
        # mapping): delivered, but conntrack would not record it here.
        return binding.internal

    # -- state ---------------------------------------------------------------

    def mappings(self, now: float) -> list[MappingView]:
        """The live mappings at ``now``."""
        self._expire(now)
        return [
            MappingView(
                b.internal,
                (self.external_ip, b.port),
                {r: (f.outbound and f.inbound, f.expires) for r, f in b.flows.items()},
            )
            for b in self._by_port.values()
        ]

    def __len__(self) -> int:
        return len(self._by_port)

    def _map(self, internal: Address, key: object) -> _Binding:
        port = self._allocate(internal[1])
        binding = _Binding(internal, key, port)
        self._by_port[port] = binding
        self._by_key[internal, key] = binding
        self.statistics.mappings += 1
        return binding

    def _allocate(self, preferred: int) -> int:
        low, high = self.port_range
        # Symmetric NATs randomise every port; the others keep the
        # internal one when they can, as MASQUERADE does.
        if (
            self.behaviour.mapping is not Mapping.ADDRESS_AND_PORT_DEPENDENT
            and low <= preferred <= high
            and preferred not in self._by_port
        ):
            return preferred
        for _ in range(64):
            port = self._rng.randint(low, high)
            if port not in self._by_port:
                return port
        free = [p for p in range(low, high + 1) if p not in self._by_port]
        if not free:
            raise RuntimeError(f"{self!r}: every external port is mapped")
        return self._rng.choice(free)

    def _touch(
        self, binding: _Binding, remote: Address, now: float, *, outbound: bool
    ) -> None:
        flow = binding.flows.get(remote)
        if flow is None:
            flow = binding.flows[remote] = _Flow(remote, now)
            self._flow_of[binding.internal, remote] = binding
        if outbound:
            flow.outbound = True
        else:
            flow.inbound = True
        both = flow.outbound and flow.inbound
        flow.expires = now + (
            self.established_timeout if both else self.unreplied_timeout
        )
        self._next_expiry = min(self._next_expiry, flow.expires)

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        next_expiry = float("inf")
        for port, binding in list(self._by_port.items()):
            for remote, flow in list(binding.flows.items()):
                if flow.expires <= now:
                    del binding.flows[remote]
                    del self._flow_of[binding.internal, remote]
                else:
                    next_expiry = min(next_expiry, flow.expires)
            if not binding.flows:
                del self._by_port[port]
                del self._by_key[binding.internal, binding.key]
        self._next_expiry = next_expiry
