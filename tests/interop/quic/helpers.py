"""Shared helpers for QUIC interop tests: peer subprocesses and node identities.

A peer (an aioquic script run with ``sys.executable``, or a js-quic script
run with ``node``) speaks a tiny line protocol: it prints one JSON object per
line on stdout (``{"event": "listening", "port": ...}`` and so on) and reads
commands, one per line, on stdin (``close CODE REASON``); it exits when its
stdin closes. :func:`spawn_peer` runs one for the length of an ``async
with`` block and kills it if it does not leave on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from polykey.keys import NodeIdentity
from polykey.quic import (
    QUICClient,
    QUICConnection,
    QUICSocket,
    QUICStream,
    node_tls_identity,
    node_verifier,
)

HERE = Path(__file__).parent

Event = dict[str, Any]

#: How long a peer gets to leave after its stdin closed, before it is killed.
_EXIT_GRACE = 5.0


@attrs.frozen
class NodeCredentials:
    """A node identity, and its chain and key written as PEM files for a
    peer in another process."""

    identity: NodeIdentity
    cert_path: Path
    key_path: Path
    #: The leaf certificate alone (PEM), for a peer pinning it.
    leaf_path: Path

    @property
    def leaf_der(self) -> bytes:
        return self.identity.cert_chain_der()[0]


def write_credentials(
    identity: NodeIdentity, directory: Path, name: str
) -> NodeCredentials:
    cert_path = directory / f"{name}.crt.pem"
    key_path = directory / f"{name}.key.pem"
    leaf_path = directory / f"{name}.leaf.pem"
    cert_path.write_bytes(identity.cert_chain_pem())
    key_path.write_bytes(identity.private_key_pem())
    key_path.chmod(0o600)
    pem = identity.cert_chain_pem().decode()
    end = "-----END CERTIFICATE-----"
    leaf_path.write_text(pem[: pem.index(end) + len(end)] + "\n")
    return NodeCredentials(identity, cert_path, key_path, leaf_path)


class PeerProcess:
    """A running peer: its events (read by a background task as they come)
    and its commands."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self._process = process
        self.name = name
        #: Every event read so far, in order.
        self.events: list[Event] = []
        self._eof = False
        self._changed = trio.Event()
        self._expected: dict[str, int] = {}

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def read_events(self) -> None:
        """Parse stdout into :attr:`events` until it closes (non-JSON lines
        become ``{"event": "text", ...}``)."""
        stdout = self._process.stdout
        assert stdout is not None
        buffer = bytearray()
        try:
            while chunk := await stdout.receive_some():
                buffer += chunk
                *lines, rest = bytes(buffer).split(b"\n")
                buffer = bytearray(rest)
                for line in lines:
                    try:
                        event: Event = json.loads(line)
                    except ValueError:
                        event = {"event": "text", "text": line.decode(errors="replace")}
                    self.events.append(event)
                self._notify()
        finally:
            self._eof = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event["event"] == name]

    async def _wait_for(self, name: str, count: int) -> list[Event]:
        while True:
            errors = self.named("error")
            if errors:
                raise AssertionError(f"{self.name} reported an error: {errors}")
            found = self.named(name)
            if len(found) >= count:
                return found
            if self._eof:
                raise AssertionError(
                    f"{self.name} exited (code {await self._process.wait()}) "
                    f"before {count} {name!r} events; events: {self.events}"
                )
            await self._changed.wait()

    async def expect(self, name: str) -> Event:
        """The next ``name`` event not returned by ``expect`` before (it may
        have arrived already). Bound it with a deadline."""
        index = self._expected.get(name, 0)
        found = await self._wait_for(name, index + 1)
        self._expected[name] = index + 1
        return found[index]

    async def expect_all(self, name: str, count: int) -> list[Event]:
        """All ``name`` events once there are at least ``count``."""
        return await self._wait_for(name, count)

    async def command(self, line: str) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        await stdin.send_all(line.encode() + b"\n")

    async def close_stdin(self) -> None:
        if self._process.stdin is not None:
            with trio.CancelScope(shield=True):
                await self._process.stdin.aclose()


@asynccontextmanager
async def spawn_peer(args: Sequence[str], *, name: str) -> AsyncIterator[PeerProcess]:
    """Run a peer for the block; its stderr goes to the test's captured
    output. On leaving, close its stdin, give it a moment to exit, then
    kill it."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                list(args),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                check=False,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
        peer = PeerProcess(process, name)
        nursery.start_soon(peer.read_events)
        try:
            yield peer
        finally:
            await peer.close_stdin()
            with trio.CancelScope(shield=True), trio.move_on_after(_EXIT_GRACE):
                await process.wait()
            # Shown by pytest when the test fails.
            print(f"{name} (exit code {process.returncode}) events: {peer.events}")
            # Cancelling run_process kills what is still running.
            nursery.cancel_scope.cancel()


# -- our side of the streams ---------------------------------------------------


def payload(size: int, seed: int) -> bytes:
    """Deterministic bytes that do not compress or repeat in short periods."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 32
        counter += 1
    return bytes(out[:size])


@attrs.frozen
class Exchange:
    """A stream we opened: what we sent and what came back before FIN."""

    stream_id: int
    sent: int
    received: int
    sent_sha256: str
    received_sha256: str


#: Every stream starts with the payload's length, 8 bytes big-endian.
HEADER = struct.Struct("!Q")


async def exchange(
    conn: QUICConnection, data: bytes, *, chunk: int = 256 * 1024
) -> Exchange:
    """Open a stream and run the peers' stream protocol on it: send the
    length and ``data`` while reading the echo; the echo ends with the peer's
    FIN, then we send ours.

    The FIN order matters: js-quic 2.0.9 (quiche 0.18) now and then never
    sends the FIN of a plain echo (FIN after the peer's FIN) under load, see
    cloudflare/quiche#2525; so the echoing side ends its side while its read
    side is still open, and the opener ends its side only after the echo
    (js_quic_peer.mjs has the details)."""
    stream = await conn.open_stream()
    received = hashlib.sha256()
    total = 0
    async with stream:

        async def send() -> None:
            await stream.send_all(HEADER.pack(len(data)))
            view = memoryview(data)
            for start in range(0, len(view), chunk):
                await stream.send_all(view[start : start + chunk])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while piece := await stream.receive_some(1 << 20):
                received.update(piece)
                total += len(piece)
        await stream.send_eof()
    return Exchange(
        stream.stream_id,
        len(data),
        total,
        hashlib.sha256(data).hexdigest(),
        received.hexdigest(),
    )


class Echoes:
    """The peer streams we echoed: ``(stream id, bytes)`` once the peer's
    FIN arrived and ours went out."""

    def __init__(self) -> None:
        self.streams: list[tuple[int, int]] = []
        self._changed = trio.Event()

    def add(self, stream_id: int, size: int) -> None:
        self.streams.append((stream_id, size))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> list[int]:
        """Sizes of the first ``count`` echoed streams, sorted; bound it
        with a deadline."""
        while len(self.streams) < count:
            await self._changed.wait()
        return sorted(size for _, size in self.streams)


async def echo(stream: QUICStream, echoes: Echoes) -> None:
    """The echoing side of the stream protocol (see :func:`exchange`): read
    the length, echo that many bytes, send FIN, then read the opener's FIN
    (nothing may come before it). Reads are not bounded by ``max_bytes``:
    ``QUICStream.receive_some`` may return more than asked for."""
    async with stream:
        header = b""
        while len(header) < HEADER.size:
            piece = await stream.receive_some()
            assert piece, "the stream ended inside its header"
            header += piece
        (remaining,) = HEADER.unpack_from(header)
        data = header[HEADER.size :]
        total = 0
        while True:
            assert len(data) <= remaining, "bytes after the payload"
            if data:
                await stream.send_all(data)
                remaining -= len(data)
                total += len(data)
            if not remaining:
                break
            data = await stream.receive_some(1 << 20)
            assert data, f"the stream ended {remaining} bytes early"
        await stream.send_eof()
        extra = await stream.receive_some()
        assert extra == b"", f"{len(extra)} bytes after the payload"
    echoes.add(stream.stream_id, total)


async def dial(
    sock: QUICSocket, port: int, ours: NodeCredentials, theirs: NodeCredentials
) -> QUICConnection:
    """Our client's connection to a peer's server on loopback ``port``, as
    our node, pinned to theirs."""
    client = QUICClient(
        sock,
        node_tls_identity(ours.identity),
        verifier=node_verifier(theirs.identity.node_id),
    )
    conn = await client.connect(("127.0.0.1", port))
    assert conn.peer_identity == theirs.identity.node_id
    return conn


async def echo_streams(conn: QUICConnection, echoes: Echoes) -> None:
    """Echo every stream the peer opens, until the connection ends."""
    async with trio.open_nursery() as nursery:
        try:
            while True:
                nursery.start_soon(echo, await conn.accept_stream(), echoes)
        except trio.BrokenResourceError:
            pass


async def run_exchanges(conn: QUICConnection, sizes: Sequence[int]) -> list[Exchange]:
    """Run one :func:`exchange` per size at once; results by size."""
    results: list[Exchange] = []

    async def one(index: int, size: int) -> None:
        results.append(await exchange(conn, payload(size, index)))

    async with trio.open_nursery() as nursery:
        for index, size in enumerate(sizes):
            nursery.start_soon(one, index, size)
    return sorted(results, key=lambda result: result.sent)


def assert_peer_echoed(events: Sequence[Event], sizes: Sequence[int]) -> None:
    """The peer echoed our streams: these sizes, nothing after any payload
    (its "echoed" events come once it read our FIN)."""
    assert sorted(event["bytes"] for event in events) == sorted(sizes), events
    assert all(event["extra"] == 0 for event in events), events


def assert_echoed(result: Exchange | Event, size: int) -> None:
    """A stream we (or the peer) opened came back whole, FIN included."""
    if isinstance(result, Exchange):
        sent, received = result.sent, result.received
        sent_sha, received_sha = result.sent_sha256, result.received_sha256
    else:
        sent, received = result["sent"], result["received"]
        sent_sha, received_sha = result["sent_sha256"], result["received_sha256"]
    assert (sent, received) == (size, size), result
    assert received_sha == sent_sha, result
