"""NodeLimits: what one node lets its peers make it hold, in one place.

The defaults are for a public seed on a small VM (1 vCPU, 1 GiB): every
limit is far above what Polykey nodes do (a node keeps a connection to its
seeds and makes a few calls on each at once) and low enough that one
address (an IPv4 address, an IPv6 /64) holds a small share of the node.
docs/operations.md has each limit, what it protects, the counter that says
it bit, and the worst case of what peers can make the node buffer.
"""

from __future__ import annotations

from typing import Any

import attrs

from .nodes import NodeManagerConfig
from .quic import QUICConfig

__all__ = ["NodeLimits"]


def _at_least(least: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if not value >= least:
            raise ValueError(f"{attribute.name} must be at least {least}")

    return check


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen(kw_only=True)
class NodeLimits:
    """Resource limits of a node; each refusal is counted (see the fields).

    The QUIC ones replace the same settings of ``NodeSettings.quic``.
    """

    #: Incoming connections held at once, handshaking or verified
    #: (``ServerStatistics.refused_connections``).
    max_connections: int = attrs.field(default=512, validator=_at_least(1))
    #: The same, per remote IPv4 address or IPv6 /64: nodes behind one NAT
    #: share it (``refused_connections_per_address``).
    max_connections_per_address: int = attrs.field(default=16, validator=_at_least(1))
    #: Handshakes in flight per remote address (``refused_address_limit``).
    max_handshakes_per_address: int = attrs.field(default=16, validator=_at_least(1))
    #: New handshakes per second per remote address, beyond a burst of
    #: ``handshake_burst`` (``refused_handshake_rate``).
    handshake_rate: float = attrs.field(default=10.0, validator=_positive)
    handshake_burst: int = attrs.field(default=30, validator=_at_least(1))
    #: Handshakes in flight, in all and from one address, at which new
    #: clients are sent a Retry first (below both, a quiet dial saves that
    #: round trip; ``retries_sent``, ``unvalidated_handshakes``). 0: always.
    retry_threshold: int = attrs.field(default=16, validator=_at_least(0))
    retry_threshold_per_address: int = attrs.field(default=2, validator=_at_least(0))
    #: Handshakes plus verified connections not yet accepted
    #: (``refused_backlog``).
    accept_backlog: int = attrs.field(default=128, validator=_at_least(1))
    #: Bidirectional streams a peer may have open on one connection (a
    #: QUIC limit: a well-behaved peer waits for one to end; one that opens
    #: more is closed by quiche with STREAM_LIMIT_ERROR).
    max_streams: int = attrs.field(default=100, validator=_at_least(1))
    #: Unidirectional streams: neither Polykey nor we use them.
    max_streams_uni: int = attrs.field(default=0, validator=_at_least(0))
    #: Flow-control credit (bytes) a peer starts with per stream and per
    #: connection: what it can make us buffer unread (out of order data
    #: included) until we read; quiche grows it, while we read fast, up to
    #: the windows below.
    stream_credit: int = attrs.field(default=1024 * 1024, validator=_at_least(1))
    connection_credit: int = attrs.field(
        default=2 * 1024 * 1024, validator=_at_least(1)
    )
    #: (QUICConfig's 16 and 24 MiB are for bulk transfers on long fat
    #: paths; a node's RPC needs far less.)
    stream_window: int = attrs.field(default=4 * 1024 * 1024, validator=_at_least(1))
    connection_window: int = attrs.field(
        default=8 * 1024 * 1024, validator=_at_least(1)
    )
    #: RPC calls in flight on the node (``RPCServer`` ``refused_busy``) and
    #: on one connection (``refused_busy_connection``).
    max_calls: int = attrs.field(default=256, validator=_at_least(1))
    max_calls_per_connection: int = attrs.field(default=64, validator=_at_least(1))
    #: Bytes of one JSON-RPC message (``error_responses``, -32003).
    max_message_size: int = attrs.field(default=1024 * 1024, validator=_at_least(1))
    #: Control-socket clients served at once (``refusedBusy``).
    control_clients: int = attrs.field(default=16, validator=_at_least(1))
    #: Dial-backs of nodes that only connected to us, running at once (0:
    #: none) and waiting (``dialbacks``, ``dialbacks_dropped``).
    dialback_limit: int = attrs.field(default=4, validator=_at_least(0))
    dialback_queue: int = attrs.field(default=64, validator=_at_least(0))

    def quic_config(self, base: QUICConfig) -> QUICConfig:
        """``base`` with these limits."""
        return attrs.evolve(
            base,
            max_connections=self.max_connections,
            max_connections_per_address=self.max_connections_per_address,
            max_handshakes_per_address=self.max_handshakes_per_address,
            handshake_rate=self.handshake_rate,
            handshake_burst=self.handshake_burst,
            retry_threshold=self.retry_threshold,
            retry_threshold_per_address=self.retry_threshold_per_address,
            accept_backlog=self.accept_backlog,
            initial_max_streams_bidi=self.max_streams,
            initial_max_streams_uni=self.max_streams_uni,
            initial_max_stream_data=self.stream_credit,
            initial_max_data=self.connection_credit,
            max_stream_window=self.stream_window,
            max_connection_window=self.connection_window,
        )

    def nodes_config(self, base: NodeManagerConfig) -> NodeManagerConfig:
        """``base`` with these limits."""
        return attrs.evolve(
            base, dialback_limit=self.dialback_limit, dialback_queue=self.dialback_queue
        )
