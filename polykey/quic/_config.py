"""Settings of the QUIC layer, and the identity a node presents.

Defaults follow Polykey's use of js-quic (docs/quic.md): ALPN ``quic``,
30 s idle timeout with a 10 s keep-alive, 1350-byte UDP payloads, 10 MiB of
connection and 1 MiB of stream flow-control credit, 100 streams each way,
no active migration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from ..keys import NodeId
from . import _binding

__all__ = ["PeerVerifier", "QUICConfig", "TLSIdentity"]

#: Called with the peer's certificate chain (DER, leaf first) right after the
#: handshake. Returns the peer's NodeId, which the connection exposes as
#: ``peer_identity``; raises :class:`~polykey.quic.PeerVerificationError`
#: to refuse the peer.
PeerVerifier = Callable[[Sequence[bytes]], NodeId]


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1")


def _optional_count(
    _: object, attribute: attrs.Attribute[Any], value: int | None
) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1 (or None)")


def _optional_rate(
    _: object, attribute: attrs.Attribute[Any], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive (or None)")


def _as_chain(chain: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(chain)


@attrs.frozen(kw_only=True)
class TLSIdentity:
    """A certificate chain (DER, leaf first) and its private key (PKCS#8 DER
    or PEM)."""

    cert_chain: tuple[bytes, ...] = attrs.field(converter=_as_chain)
    private_key: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.cert_chain:
            raise ValueError("a certificate chain needs at least one certificate")


@attrs.frozen(kw_only=True)
class QUICConfig:
    """Transport settings shared by servers and clients. Durations are in
    seconds; ``0`` idle timeout means none (js-quic's default)."""

    alpn: tuple[bytes, ...] = (b"quic",)
    max_idle_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Send a PING after this long without sending anything ack-eliciting,
    #: so an idle connection outlives ``max_idle_timeout``; None disables.
    keep_alive_interval: float | None = 10.0
    max_udp_payload_size: int = 1350
    initial_max_data: int = 10 * 1024 * 1024
    initial_max_stream_data: int = 1024 * 1024
    initial_max_streams_bidi: int = 100
    initial_max_streams_uni: int = 100
    #: Upper bounds for quiche's flow-control window auto-tuning.
    max_connection_window: int = 24 * 1024 * 1024
    max_stream_window: int = 16 * 1024 * 1024
    cc_algorithm: str = "cubic"
    grease: bool = True
    #: Servers: validate new clients' addresses with a stateless Retry
    #: while under load (see the two thresholds); False: never.
    retry: bool = True
    #: Servers: handshakes in flight at which every new client is sent a
    #: Retry first, as servers under attack do; below it a quiet dial is
    #: accepted at once, saving a round trip. 0: Retry always.
    retry_threshold: int = attrs.field(default=16, validator=_positive)
    #: Servers: the same, for handshakes in flight from the client's own
    #: address (IPv4, or IPv6 /64), so one flooding address turns Retry on
    #: for itself and not for everyone.
    retry_threshold_per_address: int = attrs.field(default=2, validator=_positive)
    #: Servers: a connection still handshaking after this long is dropped.
    handshake_timeout: float = attrs.field(default=15.0, validator=_positive)
    #: Servers: connections waiting in ``accept()`` before new ones are
    #: refused.
    accept_backlog: int = 128
    #: Servers: handshakes in flight from one IP address (any port) before
    #: its new ones are refused, so one address cannot fill the backlog.
    max_handshakes_per_address: int = attrs.field(default=16, validator=_at_least_one)
    #: Servers: connections held (handshaking or verified) before new
    #: clients are refused; None: no limit (a node sets one: NodeLimits).
    max_connections: int | None = attrs.field(default=None, validator=_optional_count)
    #: Servers: the same, per remote IPv4 address or IPv6 /64.
    max_connections_per_address: int | None = attrs.field(
        default=None, validator=_optional_count
    )
    #: Servers: new handshakes per second per remote address (a token
    #: bucket holding ``handshake_burst``); None: no limit.
    handshake_rate: float | None = attrs.field(default=None, validator=_optional_rate)
    handshake_burst: int = attrs.field(default=20, validator=_at_least_one)
    #: Offer DATAGRAM frames (RFC 9221), queueing at most this many each
    #: way; None: off. Relayed connections travel in them.
    datagram_queue: int | None = None

    def binding_config(self, identity: TLSIdentity, *, server: bool) -> _binding.Config:
        return _binding.Config(
            cert_chain=b"".join(identity.cert_chain),
            private_key=identity.private_key,
            peer_cert=_binding.PeerCert.REQUIRE
            if server
            else _binding.PeerCert.REQUEST,
            alpn=self.alpn,
            max_idle_timeout_ms=round(self.max_idle_timeout * 1000),
            max_recv_udp_payload_size=self.max_udp_payload_size,
            max_send_udp_payload_size=self.max_udp_payload_size,
            initial_max_data=self.initial_max_data,
            initial_max_stream_data_bidi_local=self.initial_max_stream_data,
            initial_max_stream_data_bidi_remote=self.initial_max_stream_data,
            initial_max_stream_data_uni=self.initial_max_stream_data,
            initial_max_streams_bidi=self.initial_max_streams_bidi,
            initial_max_streams_uni=self.initial_max_streams_uni,
            max_connection_window=self.max_connection_window,
            max_stream_window=self.max_stream_window,
            cc_algorithm=self.cc_algorithm,
            grease=self.grease,
            disable_active_migration=True,
            dgram_queue_len=self.datagram_queue,
        )
