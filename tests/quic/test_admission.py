"""Who gets a handshake: Retry tokens, one connection per token, handshakes
in flight per address.

The attacker is a raw UDP socket on one address with quiche clients of its
own in memory: it asks the server for real Retry tokens, and it makes real
(decryptable) Initials that carry any token to any connection id by feeding
each client a Retry it forged itself (a Retry's integrity tag uses a public
key). Such an Initial holds a handshake slot on the server until the
handshake timeout: the attacker never answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from polykey.quic import QUICClient, QUICConfig, QUICServer, QUICSocket
from polykey.quic import _binding as b
from polykey.quic._socket import CID_LEN

from .helpers import tls_identity
from .test_loopback import echo_streams

Address = tuple[str, int]


class Attacker:
    """A raw UDP socket on one address, and quiche clients in memory."""

    def __init__(self, sock: trio.socket.SocketType, server: Address) -> None:
        self.sock = sock
        self.server = server
        self.local: Address = sock.getsockname()
        self.config = QUICConfig().binding_config(
            tls_identity("attacker"), server=False
        )
        self.buf = bytearray(65536)

    def _first_initial(self) -> tuple[b.Connection, bytes]:
        client = b.Connection.connect(
            self.config, None, os.urandom(CID_LEN), self.local, self.server
        )
        out = client.send(self.buf)
        assert out is not None
        return client, bytes(self.buf[: out[0]])

    async def send(self, packet: bytes) -> None:
        await self.sock.sendto(packet, self.server)

    async def retry(self) -> tuple[bytes, bytes]:
        """A token from the server, and the connection id its Retry told us
        to use."""
        _, packet = self._first_initial()
        await self.send(packet)
        with trio.fail_after(5):
            while True:
                answer, _ = await self.sock.recvfrom(2048)
                header = b.parse_header(answer, CID_LEN)
                if header.type is b.PacketType.RETRY:
                    return header.token, header.scid

    def initial(self, token: bytes, dcid: bytes) -> bytes:
        """A real Initial carrying ``token``, sent to ``dcid``: what quiche
        sends after a Retry naming them."""
        client, packet = self._first_initial()
        first = b.parse_header(packet, CID_LEN)
        forged = b.retry(first.scid, first.dcid, dcid, token, first.version)
        client.recv(bytearray(forged), self.server)
        out = client.send(self.buf)
        assert out is not None
        return bytes(self.buf[: out[0]])

    async def settle(self) -> None:
        # Loopback delivers at once; the server's reader handles the batch.
        await trio.sleep(0.3)


@asynccontextmanager
async def attacked_server(
    config: QUICConfig | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[QUICSocket, QUICServer, Attacker]]:
    # Retry always on unless the test says otherwise: these tests are about
    # what holds once a server under attack sends Retry.
    config = config or QUICConfig(retry_threshold=0)
    async with QUICSocket("127.0.0.1") as ss, trio.open_nursery() as nursery:
        server = QUICServer(ss, tls_identity("server"), config=config)
        nursery.start_soon(server.serve, echo_streams)
        raw = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with raw:
            await raw.bind((host, 0))
            yield ss, server, Attacker(raw, ss.local_address)
        nursery.cancel_scope.cancel()


async def test_one_token_replayed_with_fresh_dcids_makes_one_connection() -> None:
    with trio.fail_after(20):
        async with attacked_server() as (ss, server, attacker):
            token, dcid = await attacker.retry()
            await attacker.send(attacker.initial(token, dcid))
            for _ in range(130):
                await attacker.send(attacker.initial(token, os.urandom(CID_LEN)))
            await attacker.settle()
            stats = server.statistics
            assert stats.handshakes_started == 1
            assert stats.handshaking == 1
            assert stats.token_dcid_mismatch == 130
            assert ss.statistics.connections == 1


async def test_token_for_another_dcid_is_refused() -> None:
    with trio.fail_after(20):
        async with attacked_server() as (ss, server, attacker):
            token, dcid = await attacker.retry()
            other = bytes([dcid[0] ^ 1]) + dcid[1:]
            await attacker.send(attacker.initial(token, other))
            await attacker.settle()
            assert server.statistics.token_dcid_mismatch == 1
            assert server.statistics.handshakes_started == 0
            assert ss.statistics.connections == 0


async def test_a_token_admits_one_connection_only() -> None:
    # Once the first connection is gone (its handshake timed out), the
    # same Initial again must not start a second one.
    config = QUICConfig(handshake_timeout=0.3, retry_threshold=0)
    with trio.fail_after(20):
        async with attacked_server(config) as (ss, server, attacker):
            token, dcid = await attacker.retry()
            packet = attacker.initial(token, dcid)
            await attacker.send(packet)
            await attacker.settle()
            assert server.statistics.handshakes_started == 1
            while ss.statistics.connections:  # noqa: ASYNC110
                await trio.sleep(0.05)
            # The counts followed the connection's end (callbacks, no task).
            assert server.statistics.handshaking == 0
            assert server.statistics.handshakes_failed == 1
            assert server.statistics.connections == 0
            await attacker.send(packet)
            await attacker.settle()
            assert server.statistics.handshakes_started == 1
            assert server.statistics.reused_tokens == 1
            assert ss.statistics.connections == 0


async def test_bad_tokens_are_refused_and_counted() -> None:
    with trio.fail_after(20):
        async with attacked_server() as (_, server, attacker):
            token, dcid = await attacker.retry()
            forged = token[:-1] + bytes([token[-1] ^ 1])
            for bad in (forged, token[:10], b"\x00" * 60):
                await attacker.send(attacker.initial(bad, dcid))
            await attacker.settle()
            assert server.statistics.bad_tokens == 3
            assert server.statistics.handshakes_started == 0


async def test_one_address_holds_at_most_the_cap_of_handshakes() -> None:
    cap = QUICConfig().max_handshakes_per_address
    with trio.fail_after(20):
        async with attacked_server() as (_, server, attacker):
            tokens = [await attacker.retry() for _ in range(cap + 5)]
            for token, dcid in tokens:
                await attacker.send(attacker.initial(token, dcid))
            await attacker.settle()
            stats = server.statistics
            assert stats.handshakes_started == cap
            assert stats.handshaking == cap
            assert stats.refused_address_limit == 5


@pytest.mark.parametrize("tokens", [1, 40])
async def test_a_good_client_connects_while_an_attacker_floods(tokens: int) -> None:
    # The attacker on 127.0.0.1 sends an Initial for each token it was given,
    # and replays them with fresh DCIDs, more than the whole accept backlog,
    # again and again; the good client dials from 127.0.0.2.
    with trio.fail_after(30):
        await _flood_and_dial(tokens)


async def _flood_and_dial(tokens: int) -> None:
    config = QUICConfig()
    async with attacked_server() as (ss, server, attacker):
        valid = [await attacker.retry() for _ in range(tokens)]
        packets = [attacker.initial(token, dcid) for token, dcid in valid]
        packets += [
            attacker.initial(valid[i % tokens][0], os.urandom(CID_LEN))
            for i in range(config.accept_backlog + 2)
        ]

        async def flood() -> None:
            while True:
                for packet in packets:
                    await attacker.send(packet)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await attacker.settle()
            async with QUICSocket("127.0.0.2") as cs:
                client = QUICClient(cs, tls_identity("client"))
                with trio.fail_after(5):
                    conn = await client.connect(ss.local_address)
                    async with conn, await conn.open_stream() as stream:
                        await stream.send_all(b"hello")
                        await stream.send_eof()
                        assert await stream.receive_some() == b"hello"
            nursery.cancel_scope.cancel()
        stats = server.statistics
        assert stats.accepted == 1
        assert stats.refused_backlog == 0
        attacker_handshakes = min(tokens, config.max_handshakes_per_address)
        assert stats.handshakes_started == attacker_handshakes + 1


async def _dial_and_echo(server: Address, host: str = "127.0.0.2") -> None:
    async with QUICSocket(host) as cs:
        client = QUICClient(cs, tls_identity("client"))
        with trio.fail_after(5):
            conn = await client.connect(server)
            async with conn, await conn.open_stream() as stream:
                await stream.send_all(b"hello")
                await stream.send_eof()
                assert await stream.receive_some() == b"hello"


async def test_retry_turns_on_under_a_flood_and_a_quiet_dial_gets_none() -> None:
    config = QUICConfig(handshake_timeout=1.0)
    per_address = config.retry_threshold_per_address
    with trio.fail_after(30):
        async with attacked_server(config) as (ss, server, attacker):
            stats = server.statistics
            # One address floods with Initials it never follows up: past its
            # own threshold it is sent Retry...
            for _ in range(10):
                await attacker.send(attacker._first_initial()[1])
            await attacker.settle()
            assert stats.unvalidated_handshakes == per_address
            assert stats.retries_sent == 10 - per_address
            # ...and a quiet dial from another address is not.
            await _dial_and_echo(ss.local_address)
            assert stats.retries_sent == 10 - per_address
            assert stats.unvalidated_handshakes == per_address + 1
            # Many addresses (spoofed, say) fill the global threshold: now
            # every new client is sent Retry, and still gets in.
            hosts = [f"127.0.0.{i}" for i in range(3, 3 + config.retry_threshold)]
            for host in hosts:
                raw = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                with raw:
                    await raw.bind((host, 0))
                    await Attacker(raw, ss.local_address).send(
                        attacker._first_initial()[1]
                    )
            await attacker.settle()
            assert stats.handshaking >= config.retry_threshold
            retries = stats.retries_sent
            await _dial_and_echo(ss.local_address)
            assert stats.retries_sent == retries + 1
            # Once the stalled handshakes have timed out, Retry is off again.
            while stats.handshaking:  # noqa: ASYNC110
                await trio.sleep(0.05)
            await _dial_and_echo(ss.local_address)
            assert stats.retries_sent == retries + 1
