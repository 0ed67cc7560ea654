"""The socket's reads: one recvmmsg(2) for what is queued (DatagramReader).

A read that returns fewer datagrams than it has room for means the queue
was empty after them; the reader relies on that to skip the read that
would fail with EAGAIN. Addresses must be what the ``socket`` module gives,
since connections compare them with the ones they were made with.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from polykey.quic._quiche import ffi

from polykey.quic import _binding as b

_SOL_UDP = 17
_UDP_SEGMENT = 103
_UDP_GRO = 104


def _pair(
    family: int = socket.AF_INET, host: str = "127.0.0.1"
) -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    tx.bind((host, 0))
    rx.setblocking(False)
    return rx, tx


def test_a_read_takes_what_is_queued_and_tells_when_the_queue_is_empty() -> None:
    rx, tx = _pair()
    reader = b.DatagramReader(2, 65536)
    with rx, tx:
        assert reader.read(rx.fileno()) == 0  # nothing queued: no error
        tx.sendto(b"one", rx.getsockname())
        assert reader.read(rx.fileno()) == 1  # fewer than two: empty after it
        n, segment, address = reader.datagram(0)
        assert (bytes(reader.view[:n]), segment) == (b"one", 0)
        assert address == tx.getsockname()
        for payload in (b"a", b"bb", b"ccc"):
            tx.sendto(payload, rx.getsockname())
        assert reader.read(rx.fileno()) == 2  # room for two: maybe more
        got = []
        for i in range(2):
            n, _, _ = reader.datagram(i)
            got.append(bytes(reader.view[i * reader.slot : i * reader.slot + n]))
        assert got == [b"a", b"bb"]
        assert reader.read(rx.fileno()) == 1
        n, _, _ = reader.datagram(0)
        assert bytes(reader.view[:n]) == b"ccc"
        assert reader.read(rx.fileno()) == 0


def test_a_gro_batch_is_one_datagram_with_its_segment_size() -> None:
    rx, tx = _pair()
    with rx, tx:
        try:
            rx.setsockopt(_SOL_UDP, _UDP_GRO, 1)
            tx.sendmsg(
                [b"x" * 300],
                [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", 100))],
                0,
                rx.getsockname(),
            )
        except OSError:
            pytest.skip("no UDP GSO/GRO on this kernel")
        reader = b.DatagramReader(2, 65536)
        assert reader.read(rx.fileno()) == 1
        n, segment, address = reader.datagram(0)
        assert (n, segment) == (300, 100)
        assert address == tx.getsockname()


def test_dual_stack_addresses_read_as_the_socket_module_writes_them() -> None:
    try:
        rx, tx = _pair(socket.AF_INET6, "::")
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with rx, tx:
        port = rx.getsockname()[1]
        tx.sendto(b"hi", ("::ffff:127.0.0.1", port))
        reader = b.DatagramReader(2, 65536)
        assert reader.read(rx.fileno()) == 1
        _, _, address = reader.datagram(0)
        tx.sendto(b"hi", ("::ffff:127.0.0.1", port))
        rx.settimeout(5)  # a lost datagram fails the test, not hangs it
        _, expected = rx.recvfrom(100)
        assert address == expected
        assert address[0] == "::ffff:127.0.0.1"


def test_a_link_local_address_carries_its_scope_as_getnameinfo_writes_it() -> None:
    storage = ffi.new("struct sockaddr_storage *")
    sin6 = ffi.cast("struct sockaddr_in6 *", storage)
    sin6.sin6_family = socket.AF_INET6
    sin6.sin6_port = socket.htons(1314)
    ffi.memmove(
        sin6.sin6_addr.s6_addr, socket.inet_pton(socket.AF_INET6, "fe80::1"), 16
    )
    sin6.sin6_scope_id = socket.if_nametoindex("lo")
    address = b._from_sockaddr(storage, ffi.sizeof("struct sockaddr_in6"))
    host, _ = socket.getnameinfo(
        ("fe80::1", 1314, 0, socket.if_nametoindex("lo")),
        socket.NI_NUMERICHOST | socket.NI_NUMERICSERV,
    )
    assert address == (host, 1314, 0, socket.if_nametoindex("lo"))
    assert host == "fe80::1%lo"


def test_a_closed_socket_raises() -> None:
    rx, tx = _pair()
    tx.close()
    fd = rx.fileno()
    rx.close()
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        b.DatagramReader(2, 65536).read(fd)
    assert info.value.errno == errno.EBADF
