"""Hostile inputs against a live node, and the invariants checked after each
batch of them. Shared by ``tests/fuzz/`` (a few thousand inputs per entry
point) and ``bench/hardening.py`` (10^5 and more).

The node under test is a real ``python -m polykey node`` process on
loopback (:class:`LiveNode`); everything hostile comes from this process
over real sockets: UDP datagrams, QUIC connections, the control socket.
Every generator takes a seeded :class:`random.Random`, so a failing input
can be produced again.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from polykey._control import CONTROL_SOCKET, control_client
from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import NodeId, NodeIdentity
from polykey.nodes import (
    CLOSEST_ACTIVE_CONNECTIONS,
    CLOSEST_LOCAL_NODES,
    SIGNAL_FINAL,
    SIGNAL_INITIAL,
    NodeConnection,
    NodeConnectionManager,
    request_ping,
)
from polykey.quic import QUICConnectionError, QUICSocket
from polykey.rpc import CallContext, JSONValue, RPCError, RPCServer, ServerHandler

Address = tuple[str, int]

#: A ping from a well-behaved peer must be answered in this many seconds.
PING_DEADLINE = 5.0
#: After a batch, live tasks may exceed the baseline by this much (the
#: fuzzers' own connections, closing) once they had time to settle.
TASK_SLACK = 64
TASK_SETTLE = 20.0
#: RSS may grow by this much over the whole run before it counts as unbounded.
RSS_SLACK_KIB = 128 * 1024


# -- the node under test ------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@attrs.define(eq=False)
class LiveNode:
    """A ``python -m polykey node`` process; its stderr goes to ``log``."""

    state_dir: Path
    log: Path
    process: trio.Process
    node_id: NodeId
    address: Address

    @classmethod
    async def start(cls, state_dir: Path, log: Path, *extra: str) -> LiveNode:
        await trio.Path(state_dir).mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1",
                 "--port", "0", "--state-dir", str(state_dir), *extra],
                stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        assert process.stdout is not None
        buffer = b""
        try:
            with trio.fail_after(30):
                while b"Seed:" not in buffer or not buffer.endswith(b"\n"):
                    chunk = await process.stdout.receive_some()
                    if not chunk:
                        raise RuntimeError(f"the node exited; see {log}")
                    buffer += chunk
        except BaseException:
            process.kill()
            raise
        lines = dict(
            line.split(": ", 1) for line in buffer.decode().splitlines() if ": " in line
        )
        host, port = lines["Address"].rsplit(":", 1)
        return cls(
            state_dir, log, process, NodeId.from_string(lines["NodeId"]),
            (host, int(port)),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return open_fds(self.pid)

    def tracebacks(self) -> int:
        """Tracebacks the node logged (each a bug that reached a log)."""
        return self.log.read_text(errors="replace").count("Traceback")

    async def call(self, method: str, params: Any = None, seconds: float = 20) -> Any:
        with trio.fail_after(seconds):
            return await control_client(self.state_dir).unary(method, params or {})

    async def status(self) -> Any:
        return await self.call("agentStatus")

    async def graph_ids(self) -> set[NodeId]:
        nodes = (await self.call("nodesGetAll"))["nodes"]
        return {NodeId.from_string(n["nodeIdEncoded"]) for n in nodes}

    async def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            with trio.move_on_after(15):
                await self.process.wait()
        if self.alive():
            self.process.kill()
            await self.process.wait()


# -- peers of our own -------------------------------------------------------------


@contextlib.asynccontextmanager
async def client_manager(
    identity: NodeIdentity | None = None,
) -> AsyncIterator[NodeConnectionManager]:
    """A node connection manager on a fresh loopback socket: a client."""
    async with (
        QUICSocket("127.0.0.1") as socket,
        RPCServer({}) as rpc,
        trio.open_nursery() as nursery,
    ):
        manager = NodeConnectionManager(
            socket, identity or NodeIdentity.generate(), rpc
        )
        await nursery.start(manager.run)
        try:
            yield manager
        finally:
            nursery.cancel_scope.cancel()


async def ping_once(
    identity: NodeIdentity, node_id: NodeId, address: Address, deadline: float
) -> float:
    """A new connection, one ``nodesPing``, closed: seconds it took."""
    started = trio.current_time()
    with trio.fail_after(deadline):
        async with client_manager(identity) as manager:
            conn = await manager.connect(node_id, address)
            assert await request_ping(conn.rpc)
            await conn.connection.aclose()
    return trio.current_time() - started


class UDPProxy:
    """Forwards datagrams between one client and ``target``, recording what
    the client sent; :meth:`cut` makes the client vanish (nothing more is
    forwarded either way, and no close reaches the target)."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.sent: list[bytes] = []
        self.record = True
        self._client: Any = None
        self._cut = trio.CancelScope()
        self.front = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        self.back = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)

    @property
    def address(self) -> Address:
        host, port = self.front.getsockname()
        return str(host), int(port)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.front.bind(("127.0.0.1", 0))
        await self.back.bind(("127.0.0.1", 0))
        with self._cut:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._up)
                nursery.start_soon(self._down)
                task_status.started()
        self.front.close()
        self.back.close()

    async def _up(self) -> None:
        while True:
            data, self._client = await self.front.recvfrom(65536)
            if self.record:
                self.sent.append(data)
            await self.back.sendto(data, self.target)

    async def _down(self) -> None:
        while True:
            data, _ = await self.back.recvfrom(65536)
            if self._client is not None:
                await self.front.sendto(data, self._client)

    async def inject(self, data: bytes) -> None:
        """Send ``data`` to the target from the client's address there."""
        await self.back.sendto(data, self.target)

    def cut(self) -> None:
        self._cut.cancel()


# -- random inputs ------------------------------------------------------------------


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**53, -(2**63), 10**30, rng.randrange(-9, 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.14])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["", "2.0", "ping", "\u0000", "a" * 300, "\ud800x"])
    if kind in (6, 7):
        return {
            random_key(rng): random_json(rng, depth + 1)
            for _ in range(rng.randrange(5))
        }
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]


def random_key(rng: random.Random) -> str:
    return rng.choice(
        ["jsonrpc", "method", "params", "id", "metadata", "timeout", "result",
         "error", "code", "nodeIdEncoded", "host", "port", "type", "data",
         "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(8)))]
    )  # fmt: skip


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


#: Methods a node serves to other nodes (and some it does not).
NODE_METHODS = [
    "nodesPing", CLOSEST_LOCAL_NODES, CLOSEST_ACTIVE_CONNECTIONS, SIGNAL_INITIAL,
    SIGNAL_FINAL, "nodesRelayReserve", "nodesRelayConnect", "nope", "", "__init__",
    "toString",
]  # fmt: skip


def rpc_message(rng: random.Random, methods: list[str], big: bool = True) -> bytes:
    """One malformed or hostile JSON-RPC stream's bytes."""
    kind = rng.randrange(12)
    method = rng.choice(methods)
    request = {"jsonrpc": "2.0", "method": method, "params": random_json(rng), "id": 1}
    if kind == 0:
        return rng.randbytes(rng.randrange(2000))
    if kind == 1:
        return dumps(request)  # well-formed, garbage params
    if kind == 2:
        text = dumps(request)
        return text[: rng.randrange(len(text))]  # cut short
    if kind == 3:
        request[random_key(rng)] = random_json(rng)  # a field replaced
        return dumps(request)
    if kind == 4:
        return dumps(random_json(rng))  # not a request at all
    if kind == 5:
        depth = rng.choice([100, 1000, 10_000, 100_000] if big else [100, 1000])
        return b"[" * depth + b"]" * rng.choice([0, depth])
    if kind == 6:
        return (
            b'{"jsonrpc":"2.0","method":"'
            + method.encode()
            + b'","params":"\xff\xfe\xc0"}'
        )
    if kind == 7:
        digits = rng.choice([400, 5000, 50_000])
        return (
            b'{"jsonrpc":"2.0","method":"nodesPing","params":{"metadata":{"timeout":1'
            + b"0" * digits
            + b'}},"id":1}'
        )
    if kind == 8:
        return b"".join(dumps(request) for _ in range(rng.randrange(2, 50)))
    if kind == 9 and big and rng.random() < 0.02:
        size = rng.choice([1 << 20, 4 << 20])  # oversized: past the message limit
        return b'{"jsonrpc":"2.0","method":"nodesPing","params":"' + b"a" * size + b'"}'
    if kind == 10:
        request["id"] = random_json(rng)
        request["jsonrpc"] = rng.choice(["1.0", 2, None, "2.0 "])
        return dumps(request)
    # A first message fine, then garbage after it.
    return dumps(
        {"jsonrpc": "2.0", "method": method, "params": {}, "id": 2}
    ) + rng.randbytes(rng.randrange(1, 100))


def mutate_long(packet: bytes, rng: random.Random) -> bytes:
    """A mutated QUIC long-header packet (an Initial)."""
    data = bytearray(packet)
    kind = rng.randrange(7)
    if kind == 0:  # bit flips
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2 and len(data) > 7:  # connection id lengths
        offset = 5 if rng.random() < 0.5 else min(len(data) - 1, 6 + data[5])
        data[offset] = rng.choice([0, 1, 20, 21, 255, rng.randrange(256)])
    elif kind == 3:  # token length / payload length varints
        at = _length_offset(data, rng)
        if at is not None and at < len(data):
            width = rng.choice([1, 2, 4, 8])
            prefix = {1: 0, 2: 0x40, 4: 0x80, 8: 0xC0}[width]
            value = rng.randrange(1 << (8 * width - 2))
            raw = bytearray(value.to_bytes(width, "big"))
            raw[0] |= prefix
            data[at : at + 1] = raw
    elif kind == 4:  # the version
        data[1:5] = rng.choice(
            [b"\x00\x00\x00\x00", b"\x00\x00\x00\x02", b"\xff\x00\x00\x1d",
             rng.randbytes(4)]
        )  # fmt: skip
    elif kind == 5:  # the first byte: type, fixed bit, reserved bits
        data[0] = rng.randrange(256)
    else:  # coalesced garbage after it
        data += rng.randbytes(rng.randrange(1, 200))
    return bytes(data)


def _length_offset(data: bytearray, rng: random.Random) -> int | None:
    """Where an Initial's token-length varint starts, or its Length field's."""
    try:
        i = 6 + data[5]
        i += 1 + data[i]
        if i >= len(data):
            return None
        if data[0] & 0x30 == 0 and rng.random() < 0.5:
            return i  # token length
        width = 1 << (data[i] >> 6)
        token = int.from_bytes(bytes([data[i] & 0x3F]) + data[i + 1 : i + width], "big")
        return i + width + token
    except IndexError:
        return None


def mutate_short(packet: bytes, rng: random.Random) -> bytes:
    """A mutated QUIC short-header (1-RTT) packet."""
    data = bytearray(packet)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:  # inside the destination connection id
        i = rng.randrange(1, min(len(data), 21))
        data[i] = rng.randrange(256)
    elif kind == 3:
        data[0] = rng.randrange(256)
    else:
        data += rng.randbytes(rng.randrange(1, 200))
    return bytes(data)


# -- the run: entry points and invariants -------------------------------------------


@attrs.define
class EntryResult:
    name: str
    inputs: int = 0
    #: The node died, or an invariant failed after a batch.
    crashes: int = 0
    failures: list[str] = attrs.field(factory=list)
    #: Figures for the table (what the node counted, replies...).
    detail: dict[str, Any] = attrs.field(factory=dict)


class Liar(ServerHandler[Any, Any]):
    """A node list handler that answers with garbage: wrong shapes, bad
    NodeIds, bogus contacts (NodeIds no node has, at our address or at
    unroutable ones), huge lists."""

    def __init__(self, rng: random.Random, own_address: Callable[[], Address]) -> None:
        self.rng = rng
        self.own_address = own_address
        self.served = 0
        self.bogus: set[NodeId] = set()

    def parse_params(self, params: JSONValue) -> JSONValue:
        return params

    async def handle(self, params: Any, ctx: CallContext) -> AsyncIterator[Any]:
        self.served += 1
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            for _ in range(rng.randrange(5)):
                yield random_json(rng)
        elif kind == 1:  # a NodeId nobody has, here (the dial's check fails)
            for _ in range(rng.randrange(1, 20)):
                yield self.contact(self.own_address())
        elif kind == 2:
            yield {"nodeIdEncoded": rng.choice(["", "v", "z" * 60, 7, None]),
                   "nodeContact": random_json(rng)}  # fmt: skip
        elif kind == 3:  # hostile addresses
            host = rng.choice(["0.0.0.0", "::", "224.0.0.1", "255.255.255.255",
                               "x" * 300, "fe80::1%eth0", "localhost"])  # fmt: skip
            yield self.contact((host, rng.choice([0, 1, 65535, 65536, -1])))
        elif kind == 4:  # a huge list (the caller reads only so many)
            for _ in range(rng.choice([100, 1000])):
                yield self.contact(self.own_address())
        else:
            yield {"nodeIdEncoded": self.fresh_id().encode(),
                   "nodeContact": random_json(rng)}  # fmt: skip

    def fresh_id(self) -> NodeId:
        node_id = NodeId(self.rng.randbytes(32))
        self.bogus.add(node_id)
        return node_id

    def contact(self, address: Address) -> Any:
        host, port = address
        return {
            "nodeIdEncoded": self.fresh_id().encode(),
            "nodeContact": {
                f"{host}-{port}": {
                    "mode": "direct",
                    "connectedTime": 0,
                    "scopes": ["global"],
                }
            },
        }


class Fuzzer:
    """Runs the entry points against ``node``; :meth:`check` the invariants."""

    def __init__(self, node: LiveNode, workdir: Path, seed: int) -> None:
        self.node = node
        self.workdir = workdir
        self.seed = seed
        self.prober = NodeIdentity.generate()
        self.rpc_identity = NodeIdentity.generate()
        #: NodeIds of the real nodes we run: the only ones the graph may hold.
        self.known: set[NodeId] = {self.prober.node_id, self.rpc_identity.node_id}
        self.base_rss = 0
        self.base_tasks = 0
        self.max_rss = 0
        #: The node's open file descriptors: at the baseline, the most seen
        #: at a check (recorded, not a failure: a bench reports them).
        self.base_fds = 0
        self.max_fds = 0
        self.max_tasks = 0
        self.ping_max = 0.0
        self.liar_rng = random.Random(seed + 99)
        self.liar_node: PolykeyNode | None = None
        self.liar: Liar | None = None
        self.liar_address: Address = ("127.0.0.1", 0)

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}:{name}")

    async def baseline(self) -> None:
        await ping_once(self.prober, self.node.node_id, self.node.address, 10)
        self.base_rss = self.max_rss = self.node.rss_kib()
        self.base_fds = self.max_fds = self.node.fds()
        self.base_tasks = self.max_tasks = (await self.node.status())["statistics"][
            "tasks"
        ]

    async def check(self) -> list[str]:
        """The invariants; each failure as a line."""
        node = self.node
        if not node.alive():
            return [f"the node exited with {node.process.returncode}"]
        failures = []
        try:
            took = await ping_once(
                self.prober, node.node_id, node.address, PING_DEADLINE
            )
            self.ping_max = max(self.ping_max, took)
        except (trio.TooSlowError, Exception) as exc:
            failures.append(f"ping failed: {exc!r}")
        rss = node.rss_kib()
        self.max_rss = max(self.max_rss, rss)
        self.max_fds = max(self.max_fds, node.fds())
        if rss > self.base_rss + RSS_SLACK_KIB:
            failures.append(f"RSS {rss} KiB, from {self.base_rss}")
        tasks = 0
        with trio.move_on_after(TASK_SETTLE):
            while True:
                tasks = (await node.status())["statistics"]["tasks"]
                if tasks <= self.base_tasks + TASK_SLACK:
                    break
                await trio.sleep(0.5)
        self.max_tasks = max(self.max_tasks, tasks)
        if tasks > self.base_tasks + TASK_SLACK:
            failures.append(f"{tasks} tasks, from {self.base_tasks}")
        strangers = await node.graph_ids() - self.known
        if strangers:
            failures.append(f"{len(strangers)} unverified nodes in the graph")
        return failures

    async def run_entry(
        self,
        name: str,
        total: int,
        batch: int,
        one_batch: Callable[[EntryResult, int, random.Random], Awaitable[None]],
    ) -> EntryResult:
        result = EntryResult(name)
        rng = self.rng(name)
        while result.inputs < total:
            n = min(batch, total - result.inputs)
            await one_batch(result, n, rng)
            result.inputs += n
            failures = await self.check()
            if failures:
                result.crashes += 1
                result.failures.extend(failures)
                if not self.node.alive():
                    break
        return result

    # -- UDP ------------------------------------------------------------------

    async def _send_datagrams(
        self, packets: Callable[[random.Random], bytes], n: int, rng: random.Random,
        inject: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """Send ``n`` datagrams (from 8 sockets, or ``inject``): bytes out,
        bytes the node answered."""
        sockets = []
        for _ in range(8):
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        sent = received = 0

        async def drain(sock: Any) -> None:
            nonlocal received
            while True:
                data = await sock.recv(65536)
                received += len(data)

        async with trio.open_nursery() as nursery:
            for sock in sockets:
                nursery.start_soon(drain, sock)
            for i in range(n):
                data = packets(rng)
                sent += len(data)
                if inject is not None and i % 2:
                    await inject(data)
                else:
                    await sockets[i % 8].sendto(data, self.node.address)
                if i % 64 == 63:
                    # Paced, so the node's receive buffer takes every one.
                    await trio.sleep(0.002)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        for sock in sockets:
            sock.close()
        return sent, received

    async def _socket_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self.node.status())["statistics"]
        return {"socket": stats["socket"], "server": stats["server"]}

    async def fuzz_datagrams(self, total: int, batch: int) -> EntryResult:
        before = await self._socket_stats()
        sent = answered = 0

        async def one(result: EntryResult, n: int, rng: random.Random) -> None:
            nonlocal sent, answered
            s, r = await self._send_datagrams(
                lambda rng: rng.randbytes(rng.randrange(1, 1500)), n, rng
            )
            sent += s
            answered += r

        result = await self.run_entry("random datagrams", total, batch, one)
        after = await self._socket_stats()
        result.detail = {
            "seen": after["socket"]["datagrams_received"]
            - before["socket"]["datagrams_received"],
            "amplification": round(answered / max(sent, 1), 4),
        }
        return result

    async def fuzz_quic(
        self, total: int, batch: int
    ) -> tuple[EntryResult, EntryResult]:
        proxy = UDPProxy(self.node.address)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            async with client_manager(self.prober) as manager:
                with trio.fail_after(10):
                    conn = await manager.connect(self.node.node_id, proxy.address)
                    for _ in range(20):  # some 1-RTT packets of each size
                        assert await request_ping(conn.rpc)
                proxy.record = False
                initials = [
                    p for p in proxy.sent if p[0] & 0xC0 == 0xC0 and p[0] & 0x30 == 0
                ]
                shorts = [p for p in proxy.sent if p[0] & 0x80 == 0]
                assert initials, "no Initial captured"
                assert shorts, "no short-header packet captured"
                before = await self._socket_stats()

                async def long_batch(
                    result: EntryResult, n: int, rng: random.Random
                ) -> None:
                    await self._send_datagrams(
                        lambda rng: mutate_long(rng.choice(initials), rng), n, rng
                    )

                async def short_batch(
                    result: EntryResult, n: int, rng: random.Random
                ) -> None:
                    await self._send_datagrams(
                        lambda rng: mutate_short(rng.choice(shorts), rng), n, rng,
                        inject=proxy.inject,
                    )  # fmt: skip

                initial = await self.run_entry(
                    "mutated QUIC Initials", total, batch, long_batch
                )
                after = await self._socket_stats()
                server_before, server_after = before["server"], after["server"]
                initial.detail = {
                    "captured": len(initials),
                    **{
                        k: server_after[k] - server_before[k]
                        for k in ("retries_sent", "unvalidated_handshakes",
                                  "bad_tokens", "reused_tokens",
                                  "token_dcid_mismatch", "handshakes_started")
                        if k in server_after
                    },
                }  # fmt: skip
                short = await self.run_entry(
                    "mutated short headers", total, batch, short_batch
                )
                short.detail = {"captured": len(shorts)}
                # The connection the mutated packets claimed to be from lives on.
                try:
                    with trio.fail_after(PING_DEADLINE):
                        await request_ping(conn.rpc)
                    short.detail["own connection"] = "alive"
                except Exception as exc:
                    short.detail["own connection"] = f"lost: {exc!r}"
            nursery.cancel_scope.cancel()
        return initial, short

    # -- RPC over a verified connection -----------------------------------------------

    async def fuzz_rpc(self, total: int, batch: int, *, big: bool) -> EntryResult:
        counts = {"answered": 0, "reset": 0, "no answer": 0, "trace on wire": 0}

        async def exchange(conn: NodeConnection, data: bytes) -> None:
            try:
                with trio.fail_after(15):
                    stream = await conn.connection.open_stream()
                    reply = b""
                    async with trio.open_nursery() as nursery:

                        async def write() -> None:
                            with contextlib.suppress(Exception):
                                for i in range(0, len(data), 65536):
                                    await stream.send_all(data[i : i + 65536])
                                await stream.send_eof()

                        nursery.start_soon(write)
                        while chunk := await stream.receive_some():
                            reply += chunk
                        nursery.cancel_scope.cancel()
                    await stream.aclose()
            except trio.TooSlowError:
                counts["no answer"] += 1
                return
            except Exception:
                counts["reset"] += 1
                return
            counts["answered"] += 1
            if b"Traceback" in reply or b'File "' in reply:
                counts["trace on wire"] += 1

        connections: list[NodeConnection] = []
        async with client_manager(self.rpc_identity) as manager:

            async def one(result: EntryResult, n: int, rng: random.Random) -> None:
                inputs = [rpc_message(rng, NODE_METHODS, big) for _ in range(n)]
                limiter = trio.CapacityLimiter(16)

                async def run(data: bytes) -> None:
                    async with limiter:
                        # Through the manager for each input: it marks the
                        # connection used. Our raw streams are no RPC calls
                        # it sees, so under load its reaper closed the
                        # connection as idle mid-batch, and the rest of the
                        # batch failed at once, counted as resets. A lost
                        # connection is dialled again, and shows in the count.
                        conn = await manager.connect(
                            self.node.node_id, self.node.address
                        )
                        if not connections or connections[-1] is not conn:
                            connections.append(conn)
                        await exchange(conn, data)

                async with trio.open_nursery() as nursery:
                    for data in inputs:
                        nursery.start_soon(run, data)

            result = await self.run_entry("JSON-RPC over QUIC", total, batch, one)
        if counts["trace on wire"]:
            result.crashes += 1
            result.failures.append(f"{counts['trace on wire']} replies with a trace")
        result.detail = {**counts, "connections": len(connections)}
        return result

    # -- a verified peer that lies --------------------------------------------------

    @contextlib.asynccontextmanager
    async def liar_running(self) -> AsyncIterator[Liar]:
        liar = Liar(self.liar_rng, lambda: self.liar_address)
        settings = NodeSettings(
            state_dir=self.workdir / "liar", host="127.0.0.1", port=0,
            handlers={CLOSEST_LOCAL_NODES: liar, CLOSEST_ACTIVE_CONNECTIONS: liar},
        )  # fmt: skip
        async with PolykeyNode(settings) as node:
            self.liar_address = node.address
            self.liar_node, self.liar = node, liar
            self.known.add(node.node_id)
            host, port = node.address
            await self.node.call(
                "nodesAdd",
                {"nodeIdEncoded": str(node.node_id), "host": host, "port": port},
            )
            try:
                yield liar
            finally:
                self.liar_node = self.liar = None

    async def fuzz_node_lists(self, total: int, batch: int) -> EntryResult:
        """Lookups through the node (``nodesFind`` on its control socket)
        that ask the lying peer; inputs: garbage answers it served."""
        failed = 0
        async with self.liar_running() as liar:

            async def one(result: EntryResult, n: int, rng: random.Random) -> None:
                nonlocal failed
                goal = liar.served + n
                # The control socket serves 16 clients at once; 12 leave
                # room for the checks.
                limiter = trio.CapacityLimiter(12)

                async def find() -> None:
                    nonlocal failed
                    async with limiter:
                        target = NodeId(rng.randbytes(32))
                        try:
                            await self.node.call(
                                "nodesFind", {"nodeIdEncoded": str(target)}, 100
                            )
                        except (RPCError, trio.TooSlowError, OSError):
                            failed += 1

                while liar.served < goal:
                    async with trio.open_nursery() as nursery:
                        for _ in range(min(12, max(1, goal - liar.served))):
                            nursery.start_soon(find)
                # Inputs are counted as asked for; the liar may serve more.
                result.detail["served"] = liar.served

            result = await self.run_entry(
                "node lists (verified peer)", total, batch, one
            )
            result.detail["bogus NodeIds offered"] = len(liar.bogus)
            result.detail["lookups failed"] = failed
        return result

    async def fuzz_signalling(self, total: int, batch: int) -> EntryResult:
        errors: dict[str, int] = {}
        async with self.liar_running():
            liar = self.liar_node
            assert liar is not None
            real = [str(self.prober.node_id), str(liar.node_id), str(self.node.node_id)]

            def params(rng: random.Random) -> Any:
                if rng.random() < 0.3:
                    return random_json(rng)
                out = {
                    "targetNodeIdEncoded": rng.choice([*real, "", "x", 5]),
                    "sourceNodeIdEncoded": rng.choice([*real, None]),
                    "signature": rng.choice(
                        ["", "A" * 86, "A" * 5000, rng.randbytes(10).hex()]
                    ),
                    "relaySignature": "A" * rng.choice([0, 86]),
                    "address": {"host": rng.choice(["127.0.0.1", "::", "x"]),
                                "port": rng.choice([0, 1, 65536, "1"])},
                }  # fmt: skip
                for key in rng.sample(sorted(out), rng.randrange(len(out))):
                    out[key] = random_json(rng)
                return out

            async def one(result: EntryResult, n: int, rng: random.Random) -> None:
                limiter = trio.CapacityLimiter(16)
                # Pooled, or anew: the node closes connections idle for long
                # (the checks between batches take a while).
                with trio.fail_after(15):
                    conn = await liar.connect(self.node.node_id, self.node.address)

                async def call(method: str, p: Any) -> None:
                    async with limiter:
                        if conn.connection.closed:
                            # Lost: counted, not called.
                            errors["connection lost"] = (
                                errors.get("connection lost", 0) + 1
                            )
                            return
                        try:
                            with trio.fail_after(15):
                                await conn.rpc.unary(method, p)
                            name = "accepted"
                        except RPCError as exc:
                            name = type(exc).__name__
                        except trio.TooSlowError:
                            name = "no answer"
                        except QUICConnectionError:
                            name = "connection lost"
                        errors[name] = errors.get(name, 0) + 1

                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        method = rng.choice([SIGNAL_INITIAL, SIGNAL_FINAL])
                        nursery.start_soon(call, method, params(rng))

            result = await self.run_entry(
                "signalling (verified peer)", total, batch, one
            )
        # Every kind (a few), most frequent first: "no answer" and
        # "connection lost" must show however rare.
        result.detail = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
        return result

    # -- the control socket ------------------------------------------------------------

    async def fuzz_control(self, total: int, batch: int) -> EntryResult:
        path = self.node.state_dir / CONTROL_SOCKET
        methods = ["agentStatus", "nodesFind", "nodesPingNode", "nodesGetAll",
                   "nodesConnections", "lookupProgress", "nope", ""]  # fmt: skip
        counts = {"answered": 0, "closed": 0, "no answer": 0}

        async def one_client(data: bytes) -> None:
            try:
                with trio.fail_after(15):
                    stream = await trio.open_unix_socket(str(path))
                    async with stream:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await stream.send_all(data)
                            await stream.send_eof()
                        got = b""
                        while chunk := await stream.receive_some():
                            got += chunk
                counts["answered" if got else "closed"] += 1
            except trio.TooSlowError:
                counts["no answer"] += 1
            except (trio.BrokenResourceError, OSError):
                counts["closed"] += 1

        async def one(result: EntryResult, n: int, rng: random.Random) -> None:
            limiter = trio.CapacityLimiter(8)

            async def run(data: bytes) -> None:
                async with limiter:
                    await one_client(data)

            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(run, rpc_message(rng, methods, big=False))

        result = await self.run_entry("control socket", total, batch, one)
        result.detail = counts
        return result


async def fuzz_all(
    node: LiveNode, workdir: Path, *, seed: int, counts: dict[str, int], big: bool
) -> tuple[Fuzzer, list[EntryResult]]:
    """Every entry point with ``counts[name]`` inputs, 10 batches each."""
    fuzzer = Fuzzer(node, workdir, seed)
    await fuzzer.baseline()
    results = []

    def batch(name: str) -> int:
        return max(1, math.ceil(counts[name] / 10))

    results.append(await fuzzer.fuzz_datagrams(counts["datagrams"], batch("datagrams")))
    results.extend(await fuzzer.fuzz_quic(counts["quic"], batch("quic")))
    results.append(await fuzzer.fuzz_rpc(counts["rpc"], batch("rpc"), big=big))
    results.append(
        await fuzzer.fuzz_node_lists(counts["node_lists"], batch("node_lists"))
    )
    results.append(
        await fuzzer.fuzz_signalling(counts["signalling"], batch("signalling"))
    )
    results.append(await fuzzer.fuzz_control(counts["control"], batch("control")))
    return fuzzer, results
