"""How hard we tried to break a node, in one table: fuzzing a live node at
every entry point, connection churn and a lookup soak against one node,
SIGKILLs while nodes are added, and a 100-node network on loopback.

Run by hand: ``.venv/bin/python bench/hardening.py [--quick]``. Each
section starts its own ``python -m polykey node`` (the scale section runs
its nodes in this process, or with ``--processes`` one process a node);
everything else comes from this process over
real sockets. Progress goes to stderr; node logs stay in the directory
printed at the end. bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _util import format_table, polykey_revision

from polykey.agent import NodeLimits, NodeSettings, PolykeyNode, SeedNode
from polykey.keys import NodeId, NodeIdentity
from polykey.nodes import NodeAddress, NodeGraph, request_ping
from tests.fuzz.engine import (
    EntryResult,
    LiveNode,
    UDPProxy,
    client_manager,
    fuzz_all,
)

Row = tuple[str, list[str]]
N = TypeVar("N")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def drift(before: float, after: float) -> str:
    return f"{before:g} -> {after:g} ({(after - before) / before * 100:+.1f}%)"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- fuzzing ----------------------------------------------------------------------


async def fuzz(args: argparse.Namespace, work: Path) -> list[Row]:
    retry = ("--retry-threshold", "0") if args.retry_always else ()
    node = await LiveNode.start(work / "fuzz", work / "fuzz.log", *retry)
    try:
        counts = {
            "datagrams": args.fuzz,
            "quic": args.fuzz,
            "rpc": args.fuzz,
            "node_lists": args.node_lists,
            "signalling": args.signalling or args.fuzz,
            "control": args.fuzz,
        }
        say(f"fuzz: node {node.pid}; {counts}")
        fuzzer, results = await fuzz_all(
            node, work, seed=args.seed, counts=counts, big=True
        )
        tracebacks = node.tracebacks()
        end_fds = node.fds()
        rows = [_fuzz_row(r) for r in results]
        rows.append(
            (
                "fuzz: the node over all of it",
                [
                    "",
                    f"{tracebacks} tracebacks logged",
                    f"RSS {fuzzer.base_rss / 1024:.1f} -> max "
                    f"{fuzzer.max_rss / 1024:.1f} MiB; tasks {fuzzer.base_tasks} "
                    f"-> max {fuzzer.max_tasks}; fds {fuzzer.base_fds} -> max "
                    f"{fuzzer.max_fds} -> {end_fds} after; slowest check ping "
                    f"{fuzzer.ping_max * 1000:.0f} ms",
                ],
            )
        )
        return rows
    finally:
        await node.stop()


def _fuzz_row(result: EntryResult) -> Row:
    detail = ", ".join(f"{k} {v}" for k, v in result.detail.items())
    if result.failures:
        detail += "; FAILED: " + "; ".join(result.failures[:3])
    return (
        f"fuzz: {result.name}",
        [str(result.inputs), f"{result.crashes} crashes", detail],
    )


# -- churn and soak ------------------------------------------------------------------


async def churn(args: argparse.Namespace, work: Path, *, vanish: bool) -> Row:
    name = "vanish" if vanish else "churn"
    total = args.vanish if vanish else args.churn
    node = await LiveNode.start(work / name, work / f"{name}.log", *LOOPBACK_FLAGS)
    failures = done = 0
    warm: tuple[int, int] | None = None
    peak_connections = 0
    started = trio.current_time()

    async def one() -> None:
        # A new client each time (its own identity and socket), as on a seed.
        identity = NodeIdentity.generate()
        with trio.fail_after(20):
            if not vanish:
                async with client_manager(identity) as manager:
                    conn = await manager.connect(node.node_id, node.address)
                    assert await request_ping(conn.rpc)
                    await conn.connection.aclose()
                return
            proxy = UDPProxy(node.address)
            proxy.record = False
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                async with client_manager(identity) as manager:
                    conn = await manager.connect(node.node_id, proxy.address)
                    assert await request_ping(conn.rpc)
                    proxy.cut()  # gone: its close never reaches the node

    async def worker(count: int) -> None:
        nonlocal failures, done, warm, peak_connections
        for _ in range(count):
            try:
                await one()
            except Exception:
                failures += 1
            done += 1
            if not vanish and warm is None and done >= max(1, total // 10):
                warm = (node.rss_kib(), node.fds())
                say(f"{name}: warm at {done}: RSS {warm[0]} KiB, fds {warm[1]}")
            if done % 1000 == 0:
                active = (await node.status())["connectionsActive"]
                peak_connections = max(peak_connections, active)
                say(f"{name}: {done}/{total}, {active} connections on the node")

    async def run(count: int) -> None:
        nonlocal peak_connections
        workers = 8
        async with trio.open_nursery() as nursery:
            for i in range(workers):
                nursery.start_soon(worker, count // workers + (i < count % workers))
        peak_connections = max(
            peak_connections, (await node.status())["connectionsActive"]
        )

    async def settle() -> None:
        # Until the node let go of them: at once when closed, by its idle
        # timeout when the clients vanished.
        with trio.move_on_after(90):
            while True:
                if (await node.status())["connectionsActive"] == 0:
                    break
                await trio.sleep(1)

    try:
        if vanish:
            # Vanished clients are held for the 30 s idle timeout, so their
            # number (and the node's memory high-water mark) only peaks after
            # a while: the warm-up is a first round of half the clients, held
            # and let go; the drift is what a second, equal round adds.
            await run(total // 2)
            await settle()
            warm = (node.rss_kib(), node.fds())
            say(f"{name}: warm after {done}: RSS {warm[0]} KiB, fds {warm[1]}")
            await run(total - total // 2)
        else:
            await run(total)
        elapsed = trio.current_time() - started
        await settle()
        settled = trio.current_time() - started - elapsed
        end = (node.rss_kib(), node.fds())
        assert warm is not None
        status = await node.status()
        label = (
            f"churn: {total} clients vanish" if vanish else f"churn: {total} clients"
        )
        return (
            label,
            [
                str(done),
                f"{failures} failed",
                f"RSS KiB {drift(warm[0], end[0])}, fds {drift(warm[1], end[1])}; "
                f"{done / elapsed:.0f} conn/s; all gone {settled:.0f} s after"
                + (f"; peak {peak_connections} open" if vanish else "")
                + f"; graph {status['nodesTotal']}",
            ],
        )
    finally:
        await node.stop()


async def soak(args: argparse.Namespace, work: Path) -> Row:
    node = await LiveNode.start(work / "soak", work / "soak.log")
    seed = SeedNode(node.node_id, *node.address)
    lookups = failures = 0
    samples: list[tuple[float, int, int, int]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    PolykeyNode(
                        NodeSettings(
                            state_dir=work / f"soak-client{i}",
                            host="127.0.0.1",
                            port=0,
                            seeds=(seed,),
                        )
                    )
                )
                for i in range(args.soak_clients)
            ]
            for client in clients:
                with trio.fail_after(60):
                    await client.wait_joined()
            rng = random.Random(args.seed)
            deadline = trio.current_time() + args.soak_minutes * 60

            async def lookups_of(client: PolykeyNode) -> None:
                nonlocal lookups, failures
                while trio.current_time() < deadline:
                    try:
                        with trio.fail_after(70):
                            await client.lookup(NodeId(rng.randbytes(32)))
                        lookups += 1
                    except Exception:
                        failures += 1

            async def sample() -> None:
                while trio.current_time() < deadline:
                    status = await node.status()
                    samples.append(
                        (
                            trio.current_time(),
                            node.rss_kib(),
                            node.fds(),
                            status["statistics"]["tasks"],
                        )
                    )
                    say(f"soak: {lookups} lookups, RSS {samples[-1][1]} KiB")
                    await trio.sleep(10)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                for client in clients:
                    nursery.start_soon(lookups_of, client)
        served = (await node.status())["served"]
    finally:
        await node.stop()
    # Warm-up: the first fifth of the run.
    start = samples[0][0]
    span = samples[-1][0] - start
    warm = next(s for s in samples if s[0] - start >= span / 5)
    end = samples[-1]
    return (
        f"soak: {args.soak_clients} clients, {args.soak_minutes:g} min",
        [
            str(lookups),
            f"{failures} failed",
            f"RSS KiB {drift(warm[1], end[1])}, fds {drift(warm[2], end[2])}, "
            f"tasks {drift(warm[3], end[3])}; the seed served "
            f"{served['rpcCalls']} calls",
        ],
    )


# -- crash consistency -----------------------------------------------------------------


async def crash(args: argparse.Namespace, work: Path) -> Row:
    state = work / "crash"
    rng = random.Random(args.seed)
    acked: set[NodeId] = set()
    node_id: NodeId | None = None
    kills = other_id = lost = evicted = refused = 0
    # One port across restarts; the nodes added claim to be there, so a
    # full bucket's ping of a stale member fails at once (another NodeId
    # answers) and the member is evicted.
    probe = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    for _ in range(args.kills):
        node = await LiveNode.start(state, work / "crash.log", "--port", str(port))
        if node_id is None:
            node_id = node.node_id
        elif node.node_id != node_id:
            other_id += 1

        async def adder(node: LiveNode) -> None:
            nonlocal refused
            while True:
                target = NodeId(rng.randbytes(32))
                params = {"nodeIdEncoded": str(target), "host": "127.0.0.1",
                          "port": port, "ping": False}  # fmt: skip
                try:
                    reply = await node.call("nodesAdd", params, 70)
                except Exception:
                    return  # killed under it
                if reply["added"]:
                    acked.add(target)
                else:
                    refused += 1

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(adder, node)
            await trio.sleep(rng.uniform(0.05, 2.5))
            node.process.kill()
            await node.process.wait()
            kills += 1
            nursery.cancel_scope.cancel()
        # What survived: the file as the next start will open it. A node
        # may have left the graph lawfully (evicted for a newcomer, failed
        # three times): the node logs each such removal as it makes it.
        removed = {
            NodeId.from_string(line.split(" left the graph")[0].rsplit(" ", 1)[1])
            for line in (work / "crash.log").read_text().splitlines()
            if " left the graph" in line
        }
        graph = NodeGraph.open(state / "nodes.sqlite3", node_id)
        try:
            for target in list(acked):
                if target in graph:
                    continue
                if target in removed:
                    evicted += 1
                else:
                    lost += 1
                    say(f"crash: lost {target}")
                acked.discard(target)
        finally:
            graph.close()
    return (
        f"crash: SIGKILL x{kills} while adding",
        [
            str(kills),
            f"{lost} lost",
            f"{len(acked)} acknowledged adds held; {evicted} left lawfully "
            f"(evicted, failing); {refused} refused (bucket full); NodeId "
            f"changed {other_id} times",
        ],
    )


# -- scale ----------------------------------------------------------------------------


#: The churn's clients are all on 127.0.0.1, one address, and thousands of
#: them are held at once when they vanish: the per-address (and total)
#: limits a public node has would refuse them (each then waits out its
#: 20 s), so the churned node raises them.
LOOPBACK_FLAGS = (
    "--max-connections", "16384",
    "--max-connections-per-address", "16384",
    "--max-handshakes-per-address", "1024",
    "--handshake-rate", "10000",
    "--handshake-burst", "10000",
)  # fmt: skip

#: Every node of the scale run is on 127.0.0.1, one address: the per-address
#: limits a public node has (16 connections, 10 handshakes a second) would
#: refuse all but a few of them, so they are raised here.
LOOPBACK_LIMITS = NodeLimits(
    max_connections=4096,
    max_connections_per_address=4096,
    max_handshakes_per_address=1024,
    handshake_rate=10_000.0,
    handshake_burst=10_000,
)


class _Finds:
    """The finds of a scale run (every node finds ``count`` random others):
    each outcome and its rounds, and why each miss missed."""

    def __init__(self) -> None:
        self.results: list[tuple[bool, int]] = []
        self.why: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.why[key] = self.why.get(key, 0) + 1

    def failed(self, exc: Exception) -> None:
        self._count(type(exc).__name__)
        self.results.append((False, 0))

    def answered(self, ok: bool, rounds: int, found: bool, failures: int) -> None:
        """``found``: the lookup found the target at some address."""
        if not ok:
            key = "wrong address" if found else "not found"
            if not found and failures:
                key += " (with failed queries)"
            self._count(key)
        self.results.append((ok, rounds))
        if len(self.results) % 200 == 0:
            say(f"scale: {len(self.results)} finds")

    async def run(
        self,
        nodes: Sequence[N],
        rng: random.Random,
        count: int,
        find: Callable[[N, N], Awaitable[None]],
    ) -> float:
        """``find(a, b)`` for each node ``a`` and ``count`` others; seconds
        it all took."""
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for a in nodes:
                others = [b for b in nodes if b is not a]
                for b in rng.sample(others, min(count, len(others))):
                    nursery.start_soon(find, a, b)
        return trio.current_time() - started

    def figures(self, started: float, joined: float, took: float) -> list[str]:
        """The row's first columns: finds, misses, and the figures every
        scale row starts with."""
        results = self.results
        ok = sum(1 for r in results if r[0])
        rounds = [float(r[1]) for r in results if r[0]]
        return [
            str(len(results)),
            f"{len(results) - ok} not found",
            f"all started in {started:.1f} s, joined in {joined:.1f} s; "
            f"success {ok / len(results) * 100:.1f}%; "
            f"rounds p50 {pct(rounds, 0.5):g} p95 {pct(rounds, 0.95):g}; "
            f"finds took {took:.1f} s",
        ]


async def scale(args: argparse.Namespace, work: Path) -> Row:
    rng = random.Random(args.seed)
    async with contextlib.AsyncExitStack() as stack:
        seed = await stack.enter_async_context(
            PolykeyNode(
                NodeSettings(
                    state_dir=work / "scale-seed",
                    host="127.0.0.1",
                    port=0,
                    limits=LOOPBACK_LIMITS,
                )
            )
        )
        seed_ref = SeedNode(seed.node_id, *seed.address)
        started = trio.current_time()
        nodes = [seed]
        for i in range(args.nodes - 1):
            nodes.append(
                await stack.enter_async_context(
                    PolykeyNode(
                        NodeSettings(
                            state_dir=work / f"scale{i}",
                            host="127.0.0.1",
                            port=0,
                            seeds=(seed_ref,),
                            limits=LOOPBACK_LIMITS,
                        )
                    )
                )
            )
        all_started = trio.current_time() - started
        say(f"scale: {len(nodes)} nodes started in {all_started:.1f} s")
        for node in nodes[1:]:
            with trio.fail_after(300):
                await node.wait_joined()
        converge = trio.current_time() - started
        no_seed = sum(
            1 for n in nodes[1:] if n.joined is None or n.joined.seeds_reached == 0
        )
        empty_at_join = sum(1 for n in nodes[1:] if len(n.graph) == 0)
        say(
            f"scale: {len(nodes)} nodes joined in {converge:.1f} s; {no_seed} "
            f"reached no seed, {empty_at_join} with an empty graph"
        )
        finds = _Finds()
        limiter = trio.CapacityLimiter(16)

        async def find(a: PolykeyNode, b: PolykeyNode) -> None:
            async with limiter:
                try:
                    with trio.fail_after(90):
                        result = await a.manager.find(b.node_id)
                except Exception as exc:
                    finds.failed(exc)
                    return
                want = NodeAddress(*b.address)
                ok = result.found is not None and want in result.found.addresses
                finds.answered(
                    ok, result.rounds, result.found is not None, result.failures
                )

        finds_took = await finds.run(nodes, rng, args.finds, find)
        graph_sizes = sorted(len(n.graph) for n in nodes)
        stats = [n.manager.statistics() for n in nodes]
        evicted = sum(s.evictions for s in stats)
        removed = sum(s.removed_failing for s in stats)
        say("scale: stopping the nodes")
    *counts, figures = finds.figures(all_started, converge, finds_took)
    return (
        f"scale: {args.nodes} nodes, {args.finds} finds each",
        [
            *counts,
            f"{figures}; graph sizes {graph_sizes[0]}.."
            f"{graph_sizes[-1]}; at join {no_seed} reached no seed, "
            f"{empty_at_join} had an empty graph; {evicted} evictions, "
            f"{removed} removed after failing; failures: {finds.why}",
        ],
    )


async def scale_processes(args: argparse.Namespace, work: Path) -> Row:
    """The scale run with one ``python -m polykey node`` a node, driven
    over their control sockets: what a network of separate hosts does,
    without one Python process's event loop serving 100 nodes in turn."""
    rng = random.Random(args.seed)
    nodes: list[LiveNode] = []

    async def joined(node: LiveNode) -> None:
        with trio.fail_after(300):
            # The node's log is another process's file: polled.
            while "joined through" not in node.log.read_text(errors="replace"):  # noqa: ASYNC110
                await trio.sleep(0.5)

    try:
        started = trio.current_time()
        seed = await LiveNode.start(
            work / "pscale-seed", work / "pscale-seed.log", *LOOPBACK_FLAGS
        )
        nodes.append(seed)
        seed_flag = f"{seed.node_id}@{seed.address[0]}:{seed.address[1]}"
        starting = trio.CapacityLimiter(4)

        async def start(i: int) -> None:
            async with starting:
                flags = ("--seed", seed_flag, *LOOPBACK_FLAGS)
                log = work / f"pscale{i}.log"
                nodes.append(await LiveNode.start(work / f"pscale{i}", log, *flags))

        async with trio.open_nursery() as nursery:
            for i in range(args.nodes - 1):
                nursery.start_soon(start, i)
        all_started = trio.current_time() - started
        say(f"scale: {len(nodes)} node processes started in {all_started:.1f} s")
        async with trio.open_nursery() as nursery:
            for node in nodes[1:]:
                nursery.start_soon(joined, node)
        converge = trio.current_time() - started
        say(f"scale: {len(nodes)} nodes joined in {converge:.1f} s")

        finds = _Finds()
        limiter = trio.CapacityLimiter(16)
        # Below each node's 16 control clients, which a closing client's
        # socket still holds for a moment.
        per_node = {n.node_id: trio.CapacityLimiter(8) for n in nodes}

        async def find(a: LiveNode, b: LiveNode) -> None:
            async with limiter, per_node[a.node_id]:
                try:
                    result = await a.call(
                        "nodesFind", {"nodeIdEncoded": str(b.node_id)}, 90
                    )
                except Exception as exc:
                    finds.failed(exc)
                    return
                ok = [b.address[0], b.address[1]] in result["addresses"]
                if not ok:
                    say(f"scale: {a.log.stem} did not find {b.log.stem}: {result}")
                found = bool(result["addresses"])
                finds.answered(ok, result["rounds"], found, result["failures"])

        finds_took = await finds.run(nodes, rng, args.finds, find)
        statuses = [await n.status() for n in nodes]
        graph_sizes = sorted(s["nodesTotal"] for s in statuses)
        evicted = sum(s["statistics"]["manager"]["evictions"] for s in statuses)
        removed = sum(s["statistics"]["manager"]["removed_failing"] for s in statuses)
        unconfirmed = sum(
            s["statistics"]["manager"]["removed_unconfirmed"] for s in statuses
        )
        dialbacks = {
            key: sum(s["statistics"]["manager"][key] for s in statuses)
            for key in ("dialbacks", "confirmed_by_dialback", "dialbacks_dropped")
        }
        failed_queries = sum(
            s["statistics"]["manager"]["query_failures"] for s in statuses
        )
        errors = sum(s["statistics"]["manager"]["transport_errors"] for s in statuses)
        deadlines = sorted(s["statistics"]["attempt_timeout"] for s in statuses)
        say(
            f"scale: {failed_queries} queries failed, {errors} of them with an error; attempt deadlines {deadlines}"
        )
        tracebacks = sum(n.tracebacks() for n in nodes)
        say("scale: stopping the nodes")
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.stop)
    *counts, figures = finds.figures(all_started, converge, finds_took)
    return (
        f"scale: {args.nodes} node processes, {args.finds} finds each",
        [
            *counts,
            f"{figures}; graph sizes {graph_sizes[0]}.."
            f"{graph_sizes[-1]}; {evicted} evictions, {removed} removed after "
            f"failing, {unconfirmed} unconfirmed ones removed when their "
            f"connection ended; {dialbacks['dialbacks']} dial-backs, "
            f"{dialbacks['confirmed_by_dialback']} confirmed, "
            f"{dialbacks['dialbacks_dropped']} not queued; {tracebacks} "
            f"tracebacks logged; failures: {finds.why}",
        ],
    )


async def stall(args: argparse.Namespace) -> Row:
    # bench/graph_stall.py's measure, once: a burst of 1,000 adds with the
    # writer off the loop.
    from graph_stall import one_run

    longest, elapsed = await one_run("burst", 1000, True)
    return (
        "loop stall: 1000 graph adds",
        ["1000", f"{longest * 1000:.1f} ms", f"durable in {elapsed:.2f} s"],
    )


SECTIONS = ("stall", "scale", "crash", "churn", "vanish", "fuzz", "soak")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--fuzz", type=int, help="inputs per entry point")
    parser.add_argument(
        "--retry-always",
        action="store_true",
        help="fuzz a node that sends every new client a Retry (--retry-threshold 0), "
        "so token-less Initials reach the token path; by default a lone fuzzer "
        "stays below the node's Retry thresholds and is let in without one",
    )
    parser.add_argument("--node-lists", type=int, help="garbage node lists")
    parser.add_argument(
        "--signalling",
        type=int,
        help="garbage signals (default: --fuzz); some wait out a 15 s RPC timeout",
    )
    parser.add_argument("--churn", type=int, help="clean connections")
    parser.add_argument("--vanish", type=int, help="connections that vanish")
    parser.add_argument("--soak-minutes", type=float)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--kills", type=int)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--finds", type=int)
    parser.add_argument(
        "--processes",
        action="store_true",
        help="scale: one node process a node, not all nodes in this process",
    )
    args = parser.parse_args()
    defaults = {
        "fuzz": (100_000, 2_000),
        "node_lists": (2_000, 60),
        "churn": (10_000, 500),
        "vanish": (10_000, 300),
        "soak_minutes": (10.0, 1.0),
        "kills": (50, 10),
        "nodes": (100, 30),
        "finds": (20, 5),
    }
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    only = [s for s in args.only.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="hb-"))
    load_before = load()
    started = time.monotonic()
    rows: list[Row] = []
    for section in SECTIONS:
        if section not in only:
            continue
        say(f"{section} (load {load()})")
        t = time.monotonic()
        done = len(rows)
        try:
            if section == "fuzz":
                rows.extend(await fuzz(args, work))
            elif section in ("churn", "vanish"):
                rows.append(await churn(args, work, vanish=section == "vanish"))
            elif section == "soak":
                rows.append(await soak(args, work))
            elif section == "crash":
                rows.append(await crash(args, work))
            elif section == "scale" and args.processes:
                rows.append(await scale_processes(args, work))
            elif section == "scale":
                rows.append(await scale(args, work))
            else:
                rows.append(await stall(args))
        except Exception as exc:  # one broken section must not lose the rest
            rows.append((f"{section}: ERROR", ["", "", repr(exc)[:200]]))
        for label, cells in rows[done:]:
            say(f"row: {label} | {' | '.join(cells)}")
        say(f"{section}: {time.monotonic() - t:.0f} s")
    print(
        f"polykey {polykey_revision()}; seed {args.seed}; load average "
        f"{load_before} before, {load()} after; {time.monotonic() - started:.0f} s"
    )
    print(
        format_table("check", ["inputs / runs", "crashes / failures", "figures"], rows)
    )
    print(f"node logs (*.log) and state directories: {work}")


if __name__ == "__main__":
    trio.run(main)
