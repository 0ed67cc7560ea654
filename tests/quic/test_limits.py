"""Connections held in all and per address, and handshakes per second per
address: the pure bookkeeping, then each limit biting on real sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from polykey.quic import QUICClient, QUICConfig, QUICConnection, QUICServer, QUICSocket
from polykey.quic._admission import Admission, AdmissionLimits, Refusal, address_key

from .helpers import tls_identity
from .test_loopback import echo_streams


def test_address_key_is_the_ipv4_address_or_the_ipv6_slash_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2::99") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not-an-ip") == "not-an-ip"


def test_connections_in_all_and_per_address() -> None:
    admission = Admission(
        AdmissionLimits(max_connections=3, max_connections_per_address=2)
    )
    assert admission.admit("a", 0) is None
    assert admission.admit("a", 0) is None
    assert admission.admit("a", 0) is Refusal.CONNECTIONS_PER_ADDRESS
    assert admission.admit("b", 0) is None
    assert admission.admit("c", 0) is Refusal.CONNECTIONS
    admission.release("a")
    assert admission.connections == 2
    assert admission.held("a") == 1
    assert admission.admit("c", 0) is None
    for key in ("a", "b", "c"):
        admission.release(key)
    assert admission.connections == 0
    assert admission.held("a") == 0


def test_handshake_rate_is_a_bucket_per_address() -> None:
    admission = Admission(AdmissionLimits(handshake_rate=2.0, handshake_burst=3))
    assert [admission.admit("a", 0.0) for _ in range(4)] == [
        None,
        None,
        None,
        Refusal.HANDSHAKE_RATE,
    ]
    assert admission.admit("b", 0.0) is None  # its own bucket
    assert admission.admit("a", 0.25) is Refusal.HANDSHAKE_RATE  # half a token
    assert admission.admit("a", 0.5) is None  # one token back
    assert admission.admit("a", 0.5) is Refusal.HANDSHAKE_RATE


def test_buckets_are_bounded_and_full_ones_forgotten() -> None:
    admission = Admission(
        AdmissionLimits(handshake_rate=1.0, handshake_burst=2), max_buckets=10
    )
    for i in range(100):
        assert admission.admit(f"k{i}", 0.0) is None
    assert len(admission._buckets) == 10
    # Two seconds on, every bucket has refilled: all are forgotten.
    assert admission.admit("new", 2.0) is None
    assert list(admission._buckets) == ["new"]


Address = tuple[str, int]


@asynccontextmanager
async def limited_server(
    config: QUICConfig, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[QUICServer, Address, AsyncExitStack]]:
    async with (
        QUICSocket(host) as ss,
        trio.open_nursery() as nursery,
        AsyncExitStack() as clients,
    ):
        server = QUICServer(ss, tls_identity("server"), config=config)
        nursery.start_soon(server.serve, echo_streams)
        yield server, ss.local_address, clients
        nursery.cancel_scope.cancel()


async def dial(
    clients: AsyncExitStack, host: str, server: Address, *, within: float = 5
) -> QUICConnection | None:
    """A connection from a new socket on ``host`` that echoes, or None if
    none was made within ``within`` seconds."""
    sock = await clients.enter_async_context(QUICSocket(host))
    client = QUICClient(sock, tls_identity("client"))
    with trio.move_on_after(within):
        conn = await client.connect(server)
        clients.push_async_callback(conn.aclose)
        async with await conn.open_stream() as stream:
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await stream.receive_some() == b"ping"
        return conn
    return None


async def connections_drop_to(server: QUICServer, count: int) -> None:
    with trio.fail_after(5):
        while server.statistics.connections > count:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_max_connections_refuses_the_next_client_until_one_ends() -> None:
    with trio.fail_after(30):
        async with limited_server(QUICConfig(max_connections=2)) as (
            server,
            address,
            clients,
        ):
            first = await dial(clients, "127.0.0.1", address)
            assert first is not None
            assert await dial(clients, "127.0.0.2", address) is not None
            assert await dial(clients, "127.0.0.3", address, within=1) is None
            stats = server.statistics
            assert stats.refused_connections >= 1
            assert stats.connections == 2
            await first.aclose()
            await connections_drop_to(server, 1)
            assert await dial(clients, "127.0.0.3", address) is not None
            assert server.statistics.accepted == 3


async def test_max_connections_per_address_leaves_other_addresses_in() -> None:
    config = QUICConfig(max_connections_per_address=2)
    with trio.fail_after(30):
        async with limited_server(config) as (server, address, clients):
            for _ in range(2):
                assert await dial(clients, "127.0.0.1", address) is not None
            assert await dial(clients, "127.0.0.1", address, within=1) is None
            assert server.statistics.refused_connections_per_address >= 1
            assert await dial(clients, "127.0.0.2", address) is not None
            assert server.statistics.connections == 3
            assert server.statistics.refused_connections == 0


async def test_handshake_rate_per_address() -> None:
    # One token in ten seconds after a burst of two: the third handshake
    # from 127.0.0.1 is refused, one from 127.0.0.2 is not.
    config = QUICConfig(handshake_rate=0.1, handshake_burst=2)
    with trio.fail_after(30):
        async with limited_server(config) as (server, address, clients):
            for _ in range(2):
                assert await dial(clients, "127.0.0.1", address) is not None
            assert await dial(clients, "127.0.0.1", address, within=1) is None
            assert server.statistics.refused_handshake_rate >= 1
            assert await dial(clients, "127.0.0.2", address) is not None
            assert server.statistics.accepted == 3


async def test_closed_connections_give_their_slot_back() -> None:
    count = 3
    config = QUICConfig(max_connections=1)
    with trio.fail_after(30):
        async with limited_server(config) as (server, address, clients):
            for _ in range(count):
                conn = await dial(clients, "127.0.0.1", address)
                assert conn is not None
                await conn.aclose()
                await connections_drop_to(server, 0)
            assert server.statistics.accepted == count
            assert server.statistics.refused_connections == 0


async def test_a_handshake_left_unfinished_holds_its_slot_until_it_times_out() -> None:
    from .test_admission import attacked_server

    config = QUICConfig(max_connections=1, handshake_timeout=0.5, retry_threshold=0)
    with trio.fail_after(30):
        async with (
            attacked_server(config) as (ss, server, attacker),
            AsyncExitStack() as clients,
        ):
            token, dcid = await attacker.retry()
            await attacker.send(attacker.initial(token, dcid))
            await attacker.settle()
            assert server.statistics.connections == 1
            # Refused while the attacker's handshake holds the one slot...
            assert (
                await dial(clients, "127.0.0.2", ss.local_address, within=0.1) is None
            )
            assert server.statistics.refused_connections >= 1
            # ...in once it has timed out.
            await connections_drop_to(server, 0)
            assert await dial(clients, "127.0.0.2", ss.local_address) is not None
            assert server.statistics.handshakes_failed == 1


async def test_no_unidirectional_streams_offered_bidirectional_ones_work() -> None:
    from .helpers import open_pair

    async with open_pair(server_config=QUICConfig(initial_max_streams_uni=0)) as pair:
        client_conn, server_conn = await pair.connect()
        with trio.move_on_after(0.3) as waited:
            await client_conn.open_stream(unidirectional=True)
        assert waited.cancelled_caught  # the peer offers none: the opener waits
        cs, ss = await pair.stream_pair(client_conn, server_conn)
        await cs.send_all(b"bidi")
        with trio.fail_after(5):
            assert await ss.receive_some() == b"bidi"


#: Addresses of the namespace's loopback: two hosts of one /64 beside the
#: server's, and one of the next /64.
V6_SERVER = "2001:db8:1:2::1"
V6_SAME_64 = ("2001:db8:1:2::10", "2001:db8:1:2:ffff::11", "2001:db8:1:2::12")
V6_OTHER_64 = "2001:db8:1:3::10"
_IN_NAMESPACE = "POLYKEY_TEST_V6_NAMESPACE"


async def test_an_ipv6_slash_64_is_one_address_on_real_sockets() -> None:
    """Hosts of one /64 share one per-address limit; the next /64 has its
    own. Real sockets need real IPv6 addresses: the test runs itself again
    inside a network namespace whose loopback has them."""
    if os.environ.get(_IN_NAMESPACE):
        config = QUICConfig(max_connections_per_address=2)
        with trio.fail_after(30):
            async with limited_server(config, V6_SERVER) as (server, address, clients):
                for host in V6_SAME_64[:2]:
                    assert await dial(clients, host, address) is not None
                assert await dial(clients, V6_SAME_64[2], address, within=1) is None
                assert server.statistics.refused_connections_per_address >= 1
                assert await dial(clients, V6_OTHER_64, address) is not None
                assert server.statistics.connections == 3
        return
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and `ip` for a network namespace")
    namespace = f"pkv6-{os.getpid()}"
    ip = ["ip", "-n", namespace]
    await trio.run_process(["ip", "netns", "add", namespace])
    try:
        await trio.run_process([*ip, "link", "set", "lo", "up"])
        for host in (V6_SERVER, *V6_SAME_64, V6_OTHER_64):
            await trio.run_process([*ip, "addr", "add", f"{host}/64", "dev", "lo", "nodad"])
        here = f"{Path(__file__).relative_to(Path.cwd())}::{sys._getframe().f_code.co_name}"
        with trio.fail_after(60):
            inner = await trio.run_process(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", "pytest",
                 "-q", "-p", "no:cacheprovider", here],
                env={**os.environ, _IN_NAMESPACE: "1"},
                capture_stdout=True, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        assert inner.returncode == 0, inner.stdout.decode(errors="replace")
        assert b"1 passed" in inner.stdout
    finally:
        await trio.run_process(["ip", "netns", "del", namespace], check=False)
