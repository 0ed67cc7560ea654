"""A typed, safe wrapper of quiche's C API: the only module that touches cffi.

Rules this module keeps so nothing above it has to think about C:

* Every quiche error code becomes a :class:`~polykey.quic._errors.QuicheError`
  (or :class:`StreamReset` / :class:`StreamStopped`, which carry the peer's
  application code). ``QUICHE_ERR_DONE`` is not an error: the calls that can
  return it return ``None`` / ``0`` / ``False`` instead.
* Whatever quiche hands back through a pointer (ids, certificates, reasons,
  addresses) is copied into Python bytes before the next quiche call.
* Iterators are freed on every path, configs stay alive as long as any
  connection made from them, and connections are freed by ``ffi.gc`` when
  their Python object dies (or at once by :meth:`Connection.free`).
* Sizes and lengths are checked here, because a Rust panic behind the C API
  would abort the whole interpreter.

The hot path (``recv``, ``send_batch``, ``stream_recv``, ``stream_send``)
reuses per-connection scratch cdata and caches the peer's C address, so a
packet costs a handful of attribute lookups and one C call.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any, Final

import attrs

from ._address import SockAddr
from ._errors import (
    QuicheError,
    QuicheErrorCode,
    StreamReset,
    StreamStopped,
    TLSConfigError,
)
from ._quiche import ffi, lib

__all__ = [
    "MAX_CONN_ID_LEN",
    "MIN_CLIENT_INITIAL_LEN",
    "PROTOCOL_VERSION",
    "Config",
    "Connection",
    "DatagramRoute",
    "DatagramRoutes",
    "Header",
    "PacketType",
    "PathStats",
    "PeerCert",
    "PeerError",
    "Shutdown",
    "Stats",
    "negotiate_version",
    "parse_header",
    "quiche_version",
    "retry",
    "version_is_supported",
]

PROTOCOL_VERSION: Final[int] = lib.QUICHE_PROTOCOL_VERSION
MAX_CONN_ID_LEN: Final[int] = lib.QUICHE_MAX_CONN_ID_LEN
MIN_CLIENT_INITIAL_LEN: Final[int] = lib.QUICHE_MIN_CLIENT_INITIAL_LEN

# Plain ints for the hot paths' comparisons.
_DONE: Final = int(QuicheErrorCode.DONE)
_STREAM_STOPPED: Final = int(QuicheErrorCode.STREAM_STOPPED)
_STREAM_RESET: Final = int(QuicheErrorCode.STREAM_RESET)
_UINT62_MAX: Final = (1 << 62) - 1


def quiche_version() -> str:
    """The version of the linked quiche library."""
    return str(ffi.string(lib.quiche_version()).decode())


def _check(rc: int, context: str) -> int:
    if rc < 0:
        raise QuicheError(rc, context)
    return rc


def _varint_arg(value: int, what: str) -> int:
    if not 0 <= value <= _UINT62_MAX:
        raise ValueError(f"{what} must be in 0..2**62-1, not {value}")
    return value


# -- addresses --------------------------------------------------------------


class _SockAddr:
    """A C ``sockaddr`` built once for a Python address."""

    __slots__ = ("address", "len", "ptr", "storage")

    def __init__(self, address: SockAddr) -> None:
        host, port = address[0], address[1]
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        storage = ffi.new("struct sockaddr_storage *")
        if ":" in host:
            sin6 = ffi.cast("struct sockaddr_in6 *", storage)
            sin6.sin6_family = lib.AF_INET6
            sin6.sin6_port = socket.htons(port)
            sin6.sin6_flowinfo = address[2] if len(address) > 2 else 0
            ffi.memmove(
                sin6.sin6_addr.s6_addr, socket.inet_pton(socket.AF_INET6, host), 16
            )
            sin6.sin6_scope_id = address[3] if len(address) > 3 else 0
            size = ffi.sizeof("struct sockaddr_in6")
        else:
            sin = ffi.cast("struct sockaddr_in *", storage)
            sin.sin_family = lib.AF_INET
            sin.sin_port = socket.htons(port)
            ffi.memmove(
                ffi.addressof(sin.sin_addr), socket.inet_pton(socket.AF_INET, host), 4
            )
            size = ffi.sizeof("struct sockaddr_in")
        self.address = address
        self.storage = storage
        self.ptr = ffi.cast("struct sockaddr *", storage)
        self.len = size


def _from_sockaddr(ptr: Any, length: int) -> SockAddr:
    """A Python address from a C ``sockaddr`` (copied at once), as the
    ``socket`` module gives it: a link-local IPv6 host carries its scope
    (``fe80::1%eth0``), as getnameinfo(3) writes it."""
    family = ffi.cast("struct sockaddr *", ptr).sa_family
    if family == lib.AF_INET6 and length >= ffi.sizeof("struct sockaddr_in6"):
        sin6 = ffi.cast("struct sockaddr_in6 *", ptr)
        raw = bytes(ffi.buffer(sin6.sin6_addr.s6_addr, 16))
        host = socket.inet_ntop(socket.AF_INET6, raw)
        scope = sin6.sin6_scope_id
        if scope and (
            (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80)  # link-local unicast
            or (raw[0] == 0xFF and raw[1] & 0x0F == 0x02)  # link-local multicast
        ):
            try:
                host += "%" + socket.if_indextoname(scope)
            except OSError:
                host += f"%{scope}"
        return (
            host,
            socket.ntohs(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )
    if family == lib.AF_INET and length >= ffi.sizeof("struct sockaddr_in"):
        sin = ffi.cast("struct sockaddr_in *", ptr)
        host = socket.inet_ntop(
            socket.AF_INET, bytes(ffi.buffer(ffi.addressof(sin.sin_addr), 4))
        )
        return (host, socket.ntohs(sin.sin_port))
    raise ValueError(f"unsupported address family {family}")


class DatagramReader:
    """Reads a UDP socket's queued datagrams with one ``recvmmsg(2)``
    (``pk_recv_dgrams``, in C): up to ``slots`` of them, GRO batches
    included, each into its own ``slot`` bytes of :attr:`view`.

    :meth:`read` returns how many it read; fewer than ``slots`` means the
    queue was empty after them (0: it was empty), which a reader woken for
    one datagram learns without a second syscall failing with EAGAIN.
    :meth:`datagram` gives the i-th's length, GRO segment size (0: one
    datagram) and source, as the ``socket`` module writes addresses.
    """

    __slots__ = ("_addresses", "_buf", "_out", "_ptr", "slot", "slots", "view")

    #: Sources remembered (a socket's peers): bytes of the sockaddr -> address.
    _MAX_ADDRESSES: Final = 1024

    def __init__(self, slots: int, slot: int) -> None:
        self.slots = slots
        self.slot = slot
        self._buf = bytearray(slots * slot)
        #: The datagrams' bytes, the i-th at ``i * slot`` (quiche decrypts
        #: in place: spent before the next read).
        self.view = memoryview(self._buf)
        self._ptr = ffi.from_buffer(self._buf, require_writable=True)
        self._out = ffi.new("pk_dgram[]", slots)
        self._addresses: dict[bytes, SockAddr] = {}

    def read(self, fd: int) -> int:
        """Read what is queued, up to ``slots`` datagrams; raises OSError
        (a pending ICMP error, or a closed socket)."""
        got: int = lib.pk_recv_dgrams(fd, self._ptr, self.slot, self._out, self.slots)
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        return got

    def datagram(self, i: int) -> tuple[int, int, SockAddr]:
        """The i-th datagram of the last read: (length, GRO segment size or
        0, source address)."""
        entry = self._out[i]
        addr = ffi.addressof(entry, "addr")
        key = ffi.buffer(addr, entry.addr_len)[:]
        address = self._addresses.get(key)
        if address is None:
            if len(self._addresses) >= self._MAX_ADDRESSES:
                self._addresses.clear()
            address = self._addresses[key] = _from_sockaddr(addr, entry.addr_len)
        return entry.len, entry.segment, address


# -- packet headers, version negotiation, retry -----------------------------


class PacketType(enum.IntEnum):
    """quiche's packet types, as ``quiche_header_info`` reports them."""

    INITIAL = 1
    RETRY = 2
    HANDSHAKE = 3
    ZERO_RTT = 4
    SHORT = 5
    VERSION_NEGOTIATION = 6


@attrs.frozen
class Header:
    """The parts of a QUIC packet header a socket needs to route it."""

    version: int
    type: PacketType
    dcid: bytes
    scid: bytes
    token: bytes


class _HeaderParser:
    """Scratch buffers for ``quiche_header_info``, reused per packet."""

    def __init__(self) -> None:
        self.version = ffi.new("uint32_t *")
        self.type = ffi.new("uint8_t *")
        self.scid = ffi.new("uint8_t[]", MAX_CONN_ID_LEN)
        self.scid_len = ffi.new("size_t *")
        self.dcid = ffi.new("uint8_t[]", MAX_CONN_ID_LEN)
        self.dcid_len = ffi.new("size_t *")
        # Tokens are ours (Retry) or the peer's NEW_TOKEN; 512 bytes is ample
        # and quiche reports BUFFER_TOO_SHORT for anything longer.
        self.token = ffi.new("uint8_t[]", 512)
        self.token_len = ffi.new("size_t *")

    def parse(self, data: bytes | bytearray | memoryview, dcid_len: int) -> Header:
        if not 0 <= dcid_len <= MAX_CONN_ID_LEN:
            raise ValueError(f"dcid_len must be 0..{MAX_CONN_ID_LEN}")
        self.scid_len[0] = MAX_CONN_ID_LEN
        self.dcid_len[0] = MAX_CONN_ID_LEN
        self.token_len[0] = 512
        rc = lib.quiche_header_info(
            ffi.from_buffer(data),
            len(data),
            dcid_len,
            self.version,
            self.type,
            self.scid,
            self.scid_len,
            self.dcid,
            self.dcid_len,
            self.token,
            self.token_len,
        )
        _check(rc, "header")
        try:
            ptype = PacketType(self.type[0])
        except ValueError:
            raise QuicheError(
                -5, f"header: unknown packet type {self.type[0]}"
            ) from None
        return Header(
            version=self.version[0],
            type=ptype,
            dcid=ffi.buffer(self.dcid, self.dcid_len[0])[:],
            scid=ffi.buffer(self.scid, self.scid_len[0])[:],
            token=ffi.buffer(self.token, self.token_len[0])[:],
        )


_header_parser = _HeaderParser()


def parse_header(data: bytes | bytearray | memoryview, dcid_len: int) -> Header:
    """Parse a packet header; ``dcid_len`` is the length of our own
    connection ids, needed for short headers. Raises :class:`QuicheError` for
    anything that is not a QUIC packet."""
    return _header_parser.parse(data, dcid_len)


def _cid(value: bytes, what: str) -> bytes:
    if len(value) > MAX_CONN_ID_LEN:
        raise ValueError(f"{what} longer than {MAX_CONN_ID_LEN} bytes")
    return value


def negotiate_version(scid: bytes, dcid: bytes) -> bytes:
    """A Version Negotiation packet answering a packet from ``scid`` to
    ``dcid`` (pass the client's ids as they were in its header)."""
    out = ffi.new("uint8_t[]", 1350)
    n = lib.quiche_negotiate_version(
        _cid(scid, "scid"), len(scid), _cid(dcid, "dcid"), len(dcid), out, 1350
    )
    return ffi.buffer(out, _check(n, "negotiate_version"))[:]  # type: ignore[no-any-return]


def retry(
    scid: bytes, dcid: bytes, new_scid: bytes, token: bytes, version: int
) -> bytes:
    """A Retry packet: ``scid``/``dcid`` from the client's Initial,
    ``new_scid`` the id the client must use next, ``token`` ours."""
    if len(token) > 1024:
        raise ValueError("retry token too long")
    out = ffi.new("uint8_t[]", 1350)
    n = lib.quiche_retry(
        _cid(scid, "scid"),
        len(scid),
        _cid(dcid, "dcid"),
        len(dcid),
        _cid(new_scid, "new_scid"),
        len(new_scid),
        token,
        len(token),
        version,
        out,
        1350,
    )
    return ffi.buffer(out, _check(n, "retry"))[:]  # type: ignore[no-any-return]


def version_is_supported(version: int) -> bool:
    return bool(lib.quiche_version_is_supported(version & 0xFFFFFFFF))


# -- configuration ----------------------------------------------------------


class PeerCert(enum.IntEnum):
    """Whether a config asks the peer for a certificate. A client always
    gets the server's; these matter on the server side."""

    NONE = 0
    REQUEST = 1
    REQUIRE = 2


_CC_ALGORITHMS = frozenset({"reno", "cubic", "bbr2", "bbr2_gcongestion"})


class _Shared:
    """What the connections of one config share: the C out-parameters and
    the local address's ``sockaddr`` (every connection of a socket has the
    same one)."""

    __slots__ = (
        "_local",
        "error_code",
        "fin",
        "out_len",
        "out_ptr",
        "seg",
        "send_info",
        "sid",
    )

    def __init__(self) -> None:
        self.send_info = ffi.new("quiche_send_info *")
        self.seg = ffi.new("size_t *")
        self.fin = ffi.new("bool *")
        self.error_code = ffi.new("uint64_t *")
        self.sid = ffi.new("uint64_t *")
        self.out_ptr = ffi.new("uint8_t **")
        self.out_len = ffi.new("size_t *")
        self._local: _SockAddr | None = None

    def local(self, address: SockAddr) -> _SockAddr:
        local = self._local
        if local is None or local.address != address:
            local = self._local = _SockAddr(address)
        return local


class Config:
    """A ``quiche_config`` with an in-memory identity.

    The TLS context (built by our shim) asks for the peer's certificate,
    accepts any chain during the handshake and offers Ed25519; the
    application verifies the peer after the handshake. A config may be shared
    by any number of connections (of one thread) and stays alive while they
    do.
    """

    __slots__ = ("__weakref__", "_ptr", "out")

    def __init__(
        self,
        *,
        cert_chain: bytes,
        private_key: bytes,
        peer_cert: PeerCert = PeerCert.REQUIRE,
        alpn: Iterable[bytes] = (b"quic",),
        max_idle_timeout_ms: int = 0,
        max_recv_udp_payload_size: int = 1350,
        max_send_udp_payload_size: int = 1350,
        initial_max_data: int = 10 * 1024 * 1024,
        initial_max_stream_data_bidi_local: int = 1024 * 1024,
        initial_max_stream_data_bidi_remote: int = 1024 * 1024,
        initial_max_stream_data_uni: int = 1024 * 1024,
        initial_max_streams_bidi: int = 100,
        initial_max_streams_uni: int = 100,
        max_connection_window: int | None = None,
        max_stream_window: int | None = None,
        disable_active_migration: bool = True,
        cc_algorithm: str = "cubic",
        grease: bool = True,
        dgram_queue_len: int | None = None,
        active_connection_id_limit: int = 2,
    ) -> None:
        err = ffi.new("char[]", 256)
        ptr = lib.pk_config_new(
            PROTOCOL_VERSION,
            cert_chain,
            len(cert_chain),
            private_key,
            len(private_key),
            int(peer_cert),
            err,
            256,
        )
        if ptr == ffi.NULL:
            raise TLSConfigError(ffi.string(err).decode(errors="replace"))
        self._ptr = ffi.gc(ptr, lib.quiche_config_free)
        self.out = _Shared()
        c = self._ptr
        protos = b"".join(_alpn_entry(p) for p in alpn)
        if not protos:
            raise ValueError("at least one ALPN protocol is needed")
        _check(lib.quiche_config_set_application_protos(c, protos, len(protos)), "alpn")
        for value, what in (
            (max_idle_timeout_ms, "max_idle_timeout_ms"),
            (initial_max_data, "initial_max_data"),
            (initial_max_stream_data_bidi_local, "initial_max_stream_data_bidi_local"),
            (
                initial_max_stream_data_bidi_remote,
                "initial_max_stream_data_bidi_remote",
            ),
            (initial_max_stream_data_uni, "initial_max_stream_data_uni"),
            (initial_max_streams_bidi, "initial_max_streams_bidi"),
            (initial_max_streams_uni, "initial_max_streams_uni"),
        ):
            _varint_arg(value, what)
        for size, what in (
            (max_recv_udp_payload_size, "max_recv_udp_payload_size"),
            (max_send_udp_payload_size, "max_send_udp_payload_size"),
        ):
            if not 1200 <= size <= 65527:
                raise ValueError(f"{what} must be in 1200..65527, not {size}")
        lib.quiche_config_set_max_idle_timeout(c, max_idle_timeout_ms)
        lib.quiche_config_set_max_recv_udp_payload_size(c, max_recv_udp_payload_size)
        lib.quiche_config_set_max_send_udp_payload_size(c, max_send_udp_payload_size)
        lib.quiche_config_set_initial_max_data(c, initial_max_data)
        lib.quiche_config_set_initial_max_stream_data_bidi_local(
            c, initial_max_stream_data_bidi_local
        )
        lib.quiche_config_set_initial_max_stream_data_bidi_remote(
            c, initial_max_stream_data_bidi_remote
        )
        lib.quiche_config_set_initial_max_stream_data_uni(
            c, initial_max_stream_data_uni
        )
        lib.quiche_config_set_initial_max_streams_bidi(c, initial_max_streams_bidi)
        lib.quiche_config_set_initial_max_streams_uni(c, initial_max_streams_uni)
        if max_connection_window is not None:
            lib.quiche_config_set_max_connection_window(
                c, _varint_arg(max_connection_window, "max_connection_window")
            )
        if max_stream_window is not None:
            lib.quiche_config_set_max_stream_window(
                c, _varint_arg(max_stream_window, "max_stream_window")
            )
        lib.quiche_config_set_disable_active_migration(c, disable_active_migration)
        if cc_algorithm not in _CC_ALGORITHMS:
            raise ValueError(f"unknown congestion control {cc_algorithm!r}")
        _check(
            lib.quiche_config_set_cc_algorithm_name(c, cc_algorithm.encode()),
            "cc_algorithm",
        )
        lib.quiche_config_grease(c, grease)
        # Pacing only sets send_info.at, which the socket does not honour.
        lib.quiche_config_enable_pacing(c, False)
        if dgram_queue_len is not None:
            if not 0 < dgram_queue_len <= 65536:
                raise ValueError("dgram_queue_len must be in 1..65536")
            lib.quiche_config_enable_dgram(c, True, dgram_queue_len, dgram_queue_len)
        if not 2 <= active_connection_id_limit <= 16:
            raise ValueError("active_connection_id_limit must be in 2..16")
        lib.quiche_config_set_active_connection_id_limit(c, active_connection_id_limit)


def _alpn_entry(proto: bytes) -> bytes:
    if not 0 < len(proto) < 256:
        raise ValueError(f"ALPN protocol must be 1..255 bytes: {proto!r}")
    return bytes([len(proto)]) + proto


# -- connections ------------------------------------------------------------


class Shutdown(enum.IntEnum):
    READ = 0
    WRITE = 1


@attrs.frozen
class PeerError:
    """A CONNECTION_CLOSE: ``is_app`` tells an application close from a
    transport one (e.g. 0x100 + TLS alert for a failed verification)."""

    is_app: bool
    error_code: int
    reason: bytes


@attrs.frozen
class Stats:
    """quiche's connection counters (``quiche_stats``)."""

    recv: int
    sent: int
    lost: int
    spurious_lost: int
    retrans: int
    sent_bytes: int
    recv_bytes: int
    acked_bytes: int
    lost_bytes: int
    stream_retrans_bytes: int
    paths_count: int
    reset_stream_count_local: int
    stopped_stream_count_local: int
    reset_stream_count_remote: int
    stopped_stream_count_remote: int


@attrs.frozen
class PathStats:
    """quiche's per-path counters (``quiche_path_stats``); times in ns."""

    local_address: SockAddr
    peer_address: SockAddr
    active: bool
    recv: int
    sent: int
    lost: int
    retrans: int
    total_pto_count: int
    rtt_ns: int
    min_rtt_ns: int
    rttvar_ns: int
    cwnd: int
    sent_bytes: int
    recv_bytes: int
    lost_bytes: int
    pmtu: int
    delivery_rate: int


_STATS_FIELDS = tuple(f.name for f in attrs.fields(Stats))


class DatagramRoute:
    """One route of a :class:`DatagramRoutes`: datagrams starting with
    ``prefix`` are forwarded to another connection's datagrams with the
    prefix swapped (:meth:`forward`), or fed to a connection as received
    packets (:meth:`deliver`). It keeps the connection it points to alive."""

    __slots__ = ("_array", "_slot", "out", "prefix")

    _FORWARD: Final = 1
    _DELIVER: Final = 2
    PREFIX_MAX: Final = 16
    CID_MAX: Final = 20

    def __init__(self, kind: int, prefix: bytes, out: Connection) -> None:
        if not 0 < len(prefix) <= self.PREFIX_MAX:
            raise ValueError(f"a route prefix is 1 to {self.PREFIX_MAX} bytes")
        self.prefix = prefix
        self.out = out
        # The struct lives here until a table takes it into its array,
        # which the route then keeps alive too (its slot points into it).
        self._array: Any = None
        slot = self._slot = ffi.new("pk_dgram_route *")
        slot.kind = kind
        ffi.memmove(slot.prefix, prefix, len(prefix))
        slot.out = out._ptr

    @classmethod
    def forward(
        cls, prefix: bytes, out: Connection, out_prefix: bytes, budget: int
    ) -> DatagramRoute:
        if len(out_prefix) != len(prefix):
            raise ValueError("both prefixes of a route have one length")
        route = cls(cls._FORWARD, prefix, out)
        ffi.memmove(route._slot.out_prefix, out_prefix, len(out_prefix))
        route.budget = budget
        return route

    @classmethod
    def deliver(cls, prefix: bytes, out: Connection, dcid: bytes) -> DatagramRoute:
        route = cls(cls._DELIVER, prefix, out)
        route._slot.info = out._recv_info
        route.dcid = dcid
        return route

    @property
    def budget(self) -> int:
        """Payload bytes a forward may still carry."""
        return int(self._slot.budget)

    @budget.setter
    def budget(self, value: int) -> None:
        self._slot.budget = max(0, min(value, 2**64 - 1))

    @property
    def dcid(self) -> bytes:
        return bytes(ffi.buffer(self._slot.dcid, self._slot.dcid_len))

    @dcid.setter
    def dcid(self, value: bytes) -> None:
        """The connection id a delivered packet must carry."""
        if len(value) > self.CID_MAX:
            raise ValueError("connection id too long")
        ffi.memmove(self._slot.dcid, value, len(value))
        self._slot.dcid_len = len(value)

    def counters(self) -> tuple[int, int, int]:
        """Datagrams taken, their payload bytes, and of them dropped (the
        other connection's queue was full); totals."""
        slot = self._slot
        return int(slot.datagrams), int(slot.bytes), int(slot.dropped)


class DatagramRoutes:
    """The routes of one connection's received datagrams, by a prefix of
    ``prefix_len`` bytes, for :meth:`Connection.dgram_route`. Routes change
    rarely (a circuit opens or closes): the C array is rebuilt each time."""

    def __init__(self, prefix_len: int) -> None:
        self.prefix_len = prefix_len
        self.routes: list[DatagramRoute] = []
        self._array: Any = ffi.NULL
        self._n = 0

    def add(self, route: DatagramRoute) -> None:
        if len(route.prefix) != self.prefix_len:
            raise ValueError(f"route prefixes here are {self.prefix_len} bytes")
        if any(r.prefix == route.prefix for r in self.routes):
            raise ValueError("a route for that prefix exists")
        self.routes.append(route)
        self._rebuild()

    def remove(self, route: DatagramRoute) -> None:
        if route in self.routes:
            self.routes.remove(route)
            standalone = ffi.new("pk_dgram_route *")
            ffi.memmove(standalone, route._slot, ffi.sizeof("pk_dgram_route"))
            route._slot, route._array = standalone, None
            self._rebuild()

    def _rebuild(self) -> None:
        n = len(self.routes)
        array = ffi.new("pk_dgram_route[]", n) if n else ffi.NULL
        size = ffi.sizeof("pk_dgram_route")
        for i, route in enumerate(self.routes):
            ffi.memmove(array + i, route._slot, size)
            route._slot, route._array = array + i, array
        self._array = array
        self._n = n


class Connection:
    """One ``quiche_conn``. Not thread-safe (neither is quiche); trio's
    single thread is exactly right."""

    __slots__ = (
        "__weakref__",
        "_config",
        "_error_code",
        "_fin",
        "_local",
        "_out_len",
        "_out_ptr",
        "_peer",
        "_ptr",
        "_recv_info",
        "_seg",
        "_send_info",
        "_sid",
        "_to_cache",
    )

    def __init__(
        self, ptr: Any, config: Config, local: SockAddr, peer: SockAddr
    ) -> None:
        if ptr == ffi.NULL:
            raise QuicheError(-6, "connection could not be created")
        self._ptr = ffi.gc(ptr, lib.quiche_conn_free)
        self._config = config  # quiche's TLS context must outlive the conn
        self._local = config.out.local(local)
        self._peer = _SockAddr(peer)
        self._recv_info = ffi.new("quiche_recv_info *")
        self._set_recv_info()
        # Out-parameters, read right after the C call that fills them, so
        # the connections of one config share them (about 600 bytes less
        # per connection than a set each).
        out = config.out
        self._send_info = out.send_info
        self._seg = out.seg
        self._fin = out.fin
        self._error_code = out.error_code
        self._sid = out.sid
        self._out_ptr = out.out_ptr
        self._out_len = out.out_len
        # The C peer address, so that sends to it (almost every send) give
        # back ``peer`` itself, not a copy of it each connection would keep.
        self._to_cache: tuple[bytes, SockAddr] = (
            bytes(ffi.buffer(self._peer.ptr, self._peer.len)),
            peer,
        )

    def _set_recv_info(self) -> None:
        # "from" is a Python keyword, hence setattr.
        setattr(self._recv_info, "from", self._peer.ptr)
        self._recv_info.to = self._local.ptr
        self._recv_info.from_len = self._peer.len
        self._recv_info.to_len = self._local.len

    @classmethod
    def accept(
        cls,
        config: Config,
        scid: bytes,
        odcid: bytes | None,
        local: SockAddr,
        peer: SockAddr,
    ) -> Connection:
        """A server-side connection. ``odcid`` is the original destination id
        when the client came back after a Retry."""
        la, pa = _SockAddr(local), _SockAddr(peer)
        od = odcid or b""
        ptr = lib.quiche_accept(
            _cid(scid, "scid"),
            len(scid),
            _cid(od, "odcid") if od else ffi.NULL,
            len(od),
            la.ptr,
            la.len,
            pa.ptr,
            pa.len,
            config._ptr,
        )
        conn = cls(ptr, config, local, peer)
        # BoringSSL frees the handshake's configuration once it is done
        # (about 1 KiB that an idle server connection kept otherwise).
        lib.pk_conn_shed_handshake_config(conn._ptr)
        return conn

    @classmethod
    def connect(
        cls,
        config: Config,
        server_name: str | None,
        scid: bytes,
        local: SockAddr,
        peer: SockAddr,
    ) -> Connection:
        """A client-side connection; its first Initial waits in :meth:`send`."""
        la, pa = _SockAddr(local), _SockAddr(peer)
        if server_name is not None and (
            "\x00" in server_name or not 0 < len(server_name) < 256
        ):
            raise ValueError(f"bad server name {server_name!r}")
        name = server_name.encode() if server_name is not None else ffi.NULL
        ptr = lib.quiche_connect(
            name, _cid(scid, "scid"), len(scid), la.ptr, la.len, pa.ptr, pa.len,
            config._ptr,
        )  # fmt: skip
        return cls(ptr, config, local, peer)

    # -- packets ------------------------------------------------------------

    def recv(self, buf: bytearray | memoryview, peer: SockAddr) -> int:
        """Feed one datagram from ``peer`` (quiche rewrites ``buf`` in place
        while decrypting). Returns the bytes processed; raises
        :class:`QuicheError`."""
        if peer != self._peer.address:
            self._peer = _SockAddr(peer)
            self._set_recv_info()
        n = lib.quiche_conn_recv(
            self._ptr, ffi.from_buffer(buf, require_writable=True), len(buf),
            self._recv_info,
        )  # fmt: skip
        if n < 0:
            if n == _DONE:
                return 0
            raise QuicheError(n, "recv")
        return n  # type: ignore[no-any-return]

    def recv_segments(
        self, buf: memoryview, segment: int, dcid: bytes, peer: SockAddr
    ) -> int:
        """Feed the consecutive ``segment``-sized datagrams of a GRO buffer,
        stopping before the first that is not a short-header packet for
        ``dcid``; returns the bytes consumed (one C call for the lot)."""
        if peer != self._peer.address:
            self._peer = _SockAddr(peer)
            self._set_recv_info()
        return lib.pk_conn_recv_segments(  # type: ignore[no-any-return]
            self._ptr, ffi.from_buffer(buf, require_writable=True), len(buf),
            segment, dcid, len(dcid), self._recv_info,
        )  # fmt: skip

    def send(self, buf: bytearray) -> tuple[int, SockAddr] | None:
        """Write the next packet into ``buf``; ``None`` when there is nothing
        to send now."""
        n = lib.quiche_conn_send(
            self._ptr, ffi.from_buffer(buf), len(buf), self._send_info
        )
        if n < 0:
            if n == _DONE:
                return None
            raise QuicheError(n, "send")
        return n, self._send_to()

    def send_batch(
        self, buf: bytearray, max_segments: int
    ) -> tuple[int, int, SockAddr] | None:
        """Write up to ``max_segments`` packets into ``buf`` back to back,
        all of the first one's size but a possibly shorter last one: one GSO
        send. Returns ``(total, segment_size, to)`` or ``None``."""
        n = lib.pk_conn_send_batch(
            self._ptr, ffi.from_buffer(buf), len(buf), max_segments, self._seg,
            self._send_info,
        )  # fmt: skip
        if n <= 0:
            if n == 0:
                return None
            raise QuicheError(n, "send")
        return n, self._seg[0], self._send_to()

    def _send_to(self) -> SockAddr:
        info = self._send_info
        raw = bytes(ffi.buffer(ffi.addressof(info.to), info.to_len))
        cached_raw, cached = self._to_cache
        if raw == cached_raw:
            return cached
        address = _from_sockaddr(ffi.addressof(info.to), info.to_len)
        self._to_cache = (raw, address)
        return address

    # -- timers -------------------------------------------------------------

    def timeout(self) -> float | None:
        """Seconds until :meth:`on_timeout` is due (real time), or ``None``."""
        ns = lib.quiche_conn_timeout_as_nanos(self._ptr)
        if ns == 0xFFFFFFFFFFFFFFFF:
            return None
        return ns / 1e9  # type: ignore[no-any-return]

    def on_timeout(self) -> None:
        lib.quiche_conn_on_timeout(self._ptr)

    def send_ack_eliciting(self) -> None:
        """Queue a PING if nothing else is due: keep-alive."""
        rc = lib.quiche_conn_send_ack_eliciting(self._ptr)
        if rc < 0 and rc != _DONE:
            raise QuicheError(rc, "send_ack_eliciting")

    # -- streams ------------------------------------------------------------

    def stream_send(
        self, stream_id: int, data: bytes | bytearray | memoryview, fin: bool = False
    ) -> int:
        """Queue ``data`` (and FIN) on a stream; returns how much quiche
        took, 0 when it has no room (wait for :meth:`writable`). Raises
        :class:`StreamStopped` if the peer sent STOP_SENDING."""
        n = lib.quiche_conn_stream_send(
            self._ptr, stream_id, ffi.from_buffer(data), len(data), fin,
            self._error_code,
        )  # fmt: skip
        if n < 0:
            if n == _DONE:
                return 0
            if n == _STREAM_STOPPED:
                raise StreamStopped(stream_id, self._error_code[0])
            raise QuicheError(n, f"stream_send({stream_id})")
        return n  # type: ignore[no-any-return]

    def stream_recv(
        self, stream_id: int, buf: bytearray, max_len: int | None = None
    ) -> tuple[int, bool] | None:
        """Read into ``buf`` (at most ``max_len`` bytes): ``(n, fin)``, or
        ``None`` when nothing is readable. Raises :class:`StreamReset` if the
        peer reset the stream."""
        size = len(buf) if max_len is None else min(max_len, len(buf))
        n = lib.quiche_conn_stream_recv(
            self._ptr, stream_id, ffi.from_buffer(buf, require_writable=True),
            size, self._fin, self._error_code,
        )  # fmt: skip
        if n < 0:
            if n == _DONE:
                return None
            if n == _STREAM_RESET:
                raise StreamReset(stream_id, self._error_code[0])
            raise QuicheError(n, f"stream_recv({stream_id})")
        return n, bool(self._fin[0])

    def stream_shutdown(
        self, stream_id: int, direction: Shutdown, error_code: int
    ) -> bool:
        """STOP_SENDING (read) or RESET_STREAM (write) with ``error_code``.
        Returns False when that side was already finished."""
        rc = lib.quiche_conn_stream_shutdown(
            self._ptr, stream_id, int(direction), _varint_arg(error_code, "error_code")
        )
        if rc == _DONE:
            return False
        _check(rc, f"stream_shutdown({stream_id})")
        return True

    def stream_capacity(self, stream_id: int) -> int:
        """Bytes the stream can take now. Raises :class:`StreamStopped` if the
        peer stopped it."""
        n = lib.quiche_conn_stream_capacity(self._ptr, stream_id)
        if n < 0:
            if n == _STREAM_STOPPED:
                raise StreamStopped(stream_id, 0)
            raise QuicheError(n, f"stream_capacity({stream_id})")
        return n  # type: ignore[no-any-return]

    def stream_collect(self, stream_id: int) -> bool:
        """Touch a stream we closed so quiche may collect it (asking for its
        capacity is the touch). True once quiche no longer knows it; False
        while it is held (still open, or stopped and not yet complete). No
        exception on the way: this runs once per closed stream, one unary
        call, and raising and catching QuicheError there cost two objects
        and an enum lookup per call."""
        n = lib.quiche_conn_stream_capacity(self._ptr, stream_id)
        return n < 0 and n != _STREAM_STOPPED  # type: ignore[no-any-return]

    def stream_readable(self, stream_id: int) -> bool:
        return bool(lib.quiche_conn_stream_readable(self._ptr, stream_id))

    def stream_finished(self, stream_id: int) -> bool:
        """True once all data and FIN were read, or the stream was reset."""
        return bool(lib.quiche_conn_stream_finished(self._ptr, stream_id))

    def readable_next(self) -> int | None:
        """Pop the next readable stream id (quiche's own queue)."""
        sid = lib.quiche_conn_stream_readable_next(self._ptr)
        return None if sid < 0 else sid

    def readable(self) -> list[int]:
        return self._collect(lib.quiche_conn_readable(self._ptr))

    def _collect(self, it: Any) -> list[int]:
        if it == ffi.NULL:
            return []
        try:
            out = []
            while lib.quiche_stream_iter_next(it, self._sid):
                out.append(self._sid[0])
            return out
        finally:
            lib.quiche_stream_iter_free(it)

    def peer_streams_left_bidi(self) -> int:
        return lib.quiche_conn_peer_streams_left_bidi(self._ptr)  # type: ignore[no-any-return]

    def peer_streams_left_uni(self) -> int:
        return lib.quiche_conn_peer_streams_left_uni(self._ptr)  # type: ignore[no-any-return]

    # -- datagrams ----------------------------------------------------------

    def dgram_send(self, data: bytes) -> bool:
        """Queue an unreliable datagram; False when the queue is full."""
        rc = lib.quiche_conn_dgram_send(self._ptr, data, len(data))
        if rc == _DONE:
            return False
        _check(rc, "dgram_send")
        return True

    def dgram_max_writable_len(self) -> int | None:
        """The largest datagram that fits now; None when the peer takes none."""
        rc = lib.quiche_conn_dgram_max_writable_len(self._ptr)
        if rc == _DONE:
            return None
        return _check(rc, "dgram_max_writable_len")

    def dgram_recv(self, buf: bytearray) -> int | None:
        rc = lib.quiche_conn_dgram_recv(self._ptr, ffi.from_buffer(buf), len(buf))
        if rc == _DONE:
            return None
        return _check(rc, "dgram_recv")

    def dgram_route(self, routes: DatagramRoutes, buf: bytearray) -> int | None:
        """Drain received datagrams through ``routes`` (one C call); returns
        the length of the first one no route took, left in ``buf``, or None
        once the queue is empty."""
        rc = lib.pk_conn_dgram_route(
            self._ptr, routes._array, routes._n, routes.prefix_len,
            ffi.from_buffer(buf), len(buf),
        )  # fmt: skip
        if rc == _DONE:
            return None
        return _check(rc, "dgram_recv")

    def dgram_send_segments(
        self, prefix: bytes, data: memoryview, segment: int, scratch: bytearray
    ) -> int:
        """Queue each ``segment``-sized packet of ``data`` as a datagram
        ``prefix || packet`` (one C call); returns how many were queued."""
        if segment <= 0 or len(prefix) + min(segment, len(data)) > len(scratch):
            raise ValueError("segment does not fit the scratch buffer")
        return lib.pk_conn_dgram_send_segments(  # type: ignore[no-any-return]
            self._ptr, prefix, len(prefix), ffi.from_buffer(data), len(data),
            segment, ffi.from_buffer(scratch), len(scratch),
        )  # fmt: skip

    # -- closing and state ----------------------------------------------------

    def close(self, app: bool, error_code: int, reason: bytes = b"") -> bool:
        """Start closing; False if already closing. ``app=False`` sends a
        transport error (e.g. 0x100 + TLS alert)."""
        rc = lib.quiche_conn_close(
            self._ptr, app, _varint_arg(error_code, "error_code"), reason, len(reason)
        )
        if rc == _DONE:
            return False
        _check(rc, "close")
        return True

    def is_established(self) -> bool:
        return bool(lib.quiche_conn_is_established(self._ptr))

    def is_draining(self) -> bool:
        return bool(lib.quiche_conn_is_draining(self._ptr))

    def is_closed(self) -> bool:
        return bool(lib.quiche_conn_is_closed(self._ptr))

    def is_timed_out(self) -> bool:
        return bool(lib.quiche_conn_is_timed_out(self._ptr))

    def is_server(self) -> bool:
        return bool(lib.quiche_conn_is_server(self._ptr))

    def peer_error(self) -> PeerError | None:
        """The CONNECTION_CLOSE the peer sent, if any."""
        return self._error(lib.quiche_conn_peer_error)

    def local_error(self) -> PeerError | None:
        """The CONNECTION_CLOSE we sent, if any."""
        return self._error(lib.quiche_conn_local_error)

    def _error(self, fn: Any) -> PeerError | None:
        is_app = ffi.new("bool *")
        if not fn(self._ptr, is_app, self._error_code, self._out_ptr, self._out_len):
            return None
        return PeerError(
            is_app=bool(is_app[0]),
            error_code=self._error_code[0],
            reason=self._unpack_out(),
        )

    def _unpack_out(self) -> bytes:
        n = self._out_len[0]
        if n == 0 or self._out_ptr[0] == ffi.NULL:
            return b""
        return ffi.buffer(self._out_ptr[0], n)[:]  # type: ignore[no-any-return]

    def _bytes_of(self, fn: Any) -> bytes:
        self._out_len[0] = 0
        fn(self._ptr, self._out_ptr, self._out_len)
        return self._unpack_out()

    def source_id(self) -> bytes:
        return self._bytes_of(lib.quiche_conn_source_id)

    def trace_id(self) -> str:
        return self._bytes_of(lib.quiche_conn_trace_id).decode(errors="replace")

    def application_protocol(self) -> bytes:
        return self._bytes_of(lib.quiche_conn_application_proto)

    def take_peer_cert_chain(self) -> list[bytes]:
        """The peer's certificates as DER, leaf first (empty before the
        handshake or when the peer sent none). The shim's copy is freed:
        call once, after the handshake."""
        chain = []
        for i in range(lib.pk_conn_peer_cert_chain_len(self._ptr)):
            if not lib.pk_conn_peer_cert_chain_get(
                self._ptr, i, self._out_ptr, self._out_len
            ):
                break
            chain.append(self._unpack_out())
        lib.pk_conn_peer_cert_chain_drop(self._ptr)
        return chain

    # -- statistics -----------------------------------------------------------

    def stats(self) -> Stats:
        out = ffi.new("quiche_stats *")
        lib.quiche_conn_stats(self._ptr, out)
        return Stats(**{name: getattr(out, name) for name in _STATS_FIELDS})

    def path_stats(self) -> Iterator[PathStats]:
        """Stats of every path, the active one among them."""
        out = ffi.new("quiche_path_stats *")
        idx = 0
        while lib.quiche_conn_path_stats(self._ptr, idx, out) == 0:
            yield PathStats(
                local_address=_from_sockaddr(
                    ffi.addressof(out.local_addr), out.local_addr_len
                ),
                peer_address=_from_sockaddr(
                    ffi.addressof(out.peer_addr), out.peer_addr_len
                ),
                active=bool(out.active),
                recv=out.recv,
                sent=out.sent,
                lost=out.lost,
                retrans=out.retrans,
                total_pto_count=out.total_pto_count,
                rtt_ns=out.rtt,
                min_rtt_ns=out.min_rtt,
                rttvar_ns=out.rttvar,
                cwnd=out.cwnd,
                sent_bytes=out.sent_bytes,
                recv_bytes=out.recv_bytes,
                lost_bytes=out.lost_bytes,
                pmtu=out.pmtu,
                delivery_rate=out.delivery_rate,
            )
            idx += 1
