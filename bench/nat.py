"""NAT benchmark: every ordered pair of NAT types, through a public seed.

    sudo .venv/bin/python bench/nat.py               # the full run (a few minutes)
    sudo .venv/bin/python bench/nat.py --tries 2 --only symmetric

Needs root (network namespaces, iptables): the NAT lab of tests/natlab.
For each of the 16 ordered pairs (A behind one of none / full cone /
port-restricted / symmetric, B behind another) and each try, a fresh lab:
a seed on the public side, B joins through it, then A; A then reaches B by
NodeId alone (its control socket's ``nodesPingNode``), and for a relayed
connection A sends a bulk transfer to B through the relay and another to
the seed over its direct connection. One table from one run: the path
each try took, how many connected, the time to the first verified
connection, and relayed against direct throughput. What the numbers mean
and the caveats: bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio
from _util import BENCH_DIR, PYTHON, ROOT, format_table, polykey_revision

from polykey.nodes import RelayLimits

sys.path.insert(0, str(ROOT))
from tests.natlab.lab import (
    SEED_ADDRESS,
    Host,
    LabError,
    NatLab,
    NatType,
    can_hole_punch,
    lab_available,
)

NODE_SCRIPT = str(BENCH_DIR / "_nat_node.py")
PORT = 1314
#: The relay's default byte budget per circuit and way.
RELAY_DEFAULT_BYTES = RelayLimits().circuit_bytes
MIB = 2**20
NAMES = {
    NatType.NONE: "none",
    NatType.FULL_CONE: "full cone",
    NatType.PORT_RESTRICTED: "port-restricted",
    NatType.SYMMETRIC: "symmetric",
}
PAIRS = list(itertools.product(NatType, NatType))
#: The targets the verdict is printed against.
PUNCH_TARGET_MS = 100.0
RELAY_TARGET = 0.30


def label(a: NatType, b: NatType) -> str:
    return f"{NAMES[a]} -> {NAMES[b]}"


def expected(a: NatType, b: NatType) -> str:
    """The path tests/natlab/test_nat_nodes.py requires of the pair."""
    if not can_hole_punch(a, b):
        return "relayed"
    if b in (NatType.PORT_RESTRICTED, NatType.SYMMETRIC):
        return "punched"
    return "direct|punched"


@dataclass
class Settings:
    tries: int
    jobs: int
    bulk_bytes: int
    #: The relay's byte budget per circuit and way.
    relay_bytes: int
    bulk_cap: float
    work: Path


@dataclass
class Try:
    pair: tuple[NatType, NatType]
    n: int
    ok: bool = False
    path: str | None = None
    connect_ms: float | None = None
    attempt_ms: float | None = None
    rtt_ms: float | None = None
    b_path: str | None = None
    pooled: bool = False
    relayed_mibps: float | None = None
    direct_mibps: float | None = None
    #: Of the relayed transfer: A's packets lost / sent (inner connection),
    #: and the datagrams the relay dropped.
    relayed_loss: tuple[int, int] | None = None
    relay_drops: int | None = None
    #: Smoothed RTT (ms) and congestion window (bytes) at the end of each
    #: transfer: relayed, direct.
    bulk_paths: tuple[tuple[float, int], tuple[float, int]] | None = None
    setup_s: float = 0.0
    #: What the try was doing (named in its error, if it fails).
    stage: str = "lab"
    bulk_error: str | None = None
    #: Seconds into the try: lab built, processes loaded, both joined.
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)
    total_s: float = 0.0
    error: str | None = None


class NodeError(RuntimeError):
    pass


@dataclass
class LabProcess:
    """One bench/_nat_node.py in a lab host: JSON lines both ways."""

    name: str
    process: trio.Process
    log: IO[bytes]
    log_path: Path
    _buffer: bytearray = field(default_factory=bytearray)

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise NodeError(f"{self.name} exited: {tail}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise NodeError(f"{self.name}: {answer['error']}")
        return answer

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(obj).encode() + b"\n")
        return await self.line()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process.stdin is not None:
                try:
                    await self.process.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            self.log.close()


async def launch(
    lab: NatLab, host: Host, name: str, where: Path, s: Settings
) -> LabProcess:
    state = where / name
    log_path = where / f"{name}.log"
    log = open(log_path, "wb")  # noqa: ASYNC230, SIM115 - closed by stop()
    argv = [PYTHON, NODE_SCRIPT, "--state-dir", str(state), "--port", str(PORT),
            "--relay-bytes", str(s.relay_bytes)]  # fmt: skip
    process = await trio.lowlevel.open_process(
        lab.exec_argv(host, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=str(BENCH_DIR),
    )
    return LabProcess(name, process, log, log_path)


async def reservations(seed: LabProcess) -> int:
    """The relay reservations the seed holds."""
    status = await seed.request({"op": "status"})
    return int(status["relay"].get("reservations", 0))


async def connected(node: LabProcess, other: str) -> bool:
    status = await node.request({"op": "status"})
    return other in status["connections"]


async def forget(a: LabProcess, b: LabProcess, a_id: str, b_id: str) -> None:
    """No connection between A and B, as either side sees it."""
    await a.request({"op": "forget", "target": b_id})
    await b.request({"op": "forget", "target": a_id})
    while await connected(a, b_id) or await connected(b, a_id):  # noqa: ASYNC110
        await trio.sleep(0.01)


async def bulk(sender: LabProcess, target: str, s: Settings) -> dict[str, Any]:
    result = await sender.request(
        {"op": "bulk", "target": target, "bytes": s.bulk_bytes, "cap": s.bulk_cap}
    )
    result["mibps"] = float(result["bytes"]) / MIB / float(result["seconds"])
    return result


async def relay_drops(seed: LabProcess) -> int:
    status = await seed.request({"op": "status"})
    return int(status["relay"].get("datagrams_dropped", 0))


async def run_try(pair: tuple[NatType, NatType], n: int, s: Settings) -> Try:
    a_type, b_type = pair
    result = Try(pair, n)
    where = s.work / f"{a_type.value[:4]}-{b_type.value[:4]}-{n}"
    where.mkdir(parents=True)
    started = time.monotonic()
    procs: list[LabProcess] = []
    try:
        async with NatLab([a_type, b_type]) as lab:
            built = time.monotonic() - started
            a_host, b_host = lab.hosts
            try:
                result.stage = "setup"
                # Three processes load at once; the nodes then start in order.
                for host, name in ((lab.seed, "seed"), (b_host, "b"), (a_host, "a")):
                    procs.append(await launch(lab, host, name, where, s))
                seed, b, a = procs
                with trio.fail_after(60):
                    for proc in procs:
                        await proc.line()  # loaded
                    loaded = time.monotonic() - started
                    seed_id = (await seed.request({"op": "start"}))["nodeId"]
                    seeds = [f"{seed_id}@{SEED_ADDRESS}:{PORT}"]
                    b_info = await b.request({"op": "start", "seeds": seeds})
                    a_info = await a.request({"op": "start", "seeds": seeds})
                    # Both joined; those behind a NAT hold their reservation.
                    behind = int(a_info["behindNat"]) + int(b_info["behindNat"])
                    while await reservations(seed) < behind:  # noqa: ASYNC110 - polled
                        await trio.sleep(0.01)
                result.phases = (built, loaded, time.monotonic() - started)
                # A's join may have connected to B (a lookup that reached
                # it): close that, on both sides, so the ping's is new.
                with trio.fail_after(10):
                    await forget(a, b, a_info["nodeId"], b_info["nodeId"])
                result.setup_s = time.monotonic() - started
                result.stage = "ping"
                with trio.fail_after(75):
                    ping = await a.request({"op": "ping", "target": b_info["nodeId"]})
                if not ping.get("success"):
                    result.error = f"ping: {ping.get('error')}"
                    return result
                result.ok = True
                result.path = ping["path"]
                result.pooled = bool(ping.get("pooled"))
                result.connect_ms = ping["connectMs"]
                result.attempt_ms = ping.get("attemptMs")
                result.rtt_ms = ping["rttMs"]
                with trio.fail_after(10):
                    seen = (await b.request({"op": "status"}))["connections"]
                result.b_path = seen.get(a_info["nodeId"])
                if result.path == "relayed" and s.bulk_bytes > 0:
                    result.stage = "bulk"
                    with trio.fail_after(2 * s.bulk_cap + 60):
                        drops = await relay_drops(seed)
                        relayed = await bulk(a, b_info["nodeId"], s)
                        result.relay_drops = await relay_drops(seed) - drops
                        direct = await bulk(a, seed_id, s)
                    result.relayed_mibps = relayed["mibps"]
                    result.relayed_loss = (
                        relayed["packetsLost"],
                        relayed["packetsSent"],
                    )
                    result.direct_mibps = direct["mibps"]
                    result.bulk_paths = (
                        (relayed["rttMs"] or 0.0, relayed["cwnd"] or 0),
                        (direct["rttMs"] or 0.0, direct["cwnd"] or 0),
                    )
            finally:
                for proc in reversed(procs):
                    await proc.stop()
    except (NodeError, LabError, trio.TooSlowError, OSError) as exc:
        error = f"{result.stage}: {type(exc).__name__}: {exc}"
        if result.stage == "bulk":
            result.bulk_error = error  # it connected; the transfer failed
        else:
            result.ok = False
            result.error = error
    finally:
        result.total_s = time.monotonic() - started
        for name in ("seed", "a", "b"):
            shutil.rmtree(where / name, ignore_errors=True)
    return result


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: of 5 values, p50 is the 3rd, p95 the 5th."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def fmt_ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p):.1f}" if values else "-"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def path_mix(tries: list[Try]) -> str:
    counts = Counter(t.path for t in tries if t.ok)
    if not counts:
        return "-"
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{p} {c}" for p, c in counts.most_common())


def report(
    results: dict[tuple[NatType, NatType], list[Try]], s: Settings, load: float,
    elapsed: float, revision: str,
) -> None:  # fmt: skip
    rows: list[tuple[str, list[str]]] = []
    for pair in results:
        tries = sorted(results[pair], key=lambda t: t.n)
        good = [t for t in tries if t.ok]
        connect = [t.connect_ms for t in good if t.connect_ms is not None]
        attempt = [t.attempt_ms for t in good if t.attempt_ms is not None]
        relayed = [t.relayed_mibps for t in good if t.relayed_mibps is not None]
        direct = [t.direct_mibps for t in good if t.direct_mibps is not None]
        ratio = "-"
        if relayed and direct:
            ratio = f"{median(relayed) / median(direct):.0%}"
        rows.append(
            (
                label(*pair),
                [
                    expected(*pair),
                    path_mix(tries),
                    f"{len(good)}/{len(tries)}",
                    fmt_ms(connect, 50),
                    fmt_ms(connect, 95),
                    fmt_ms(attempt, 50),
                    fmt_ms(attempt, 95),
                    f"{median(relayed):.1f}" if relayed else "-",
                    f"{median(direct):.1f}" if direct else "-",
                    ratio,
                ],
            )
        )
    all_tries = [t for ts in results.values() for t in ts]
    setup = median([t.setup_s for t in all_tries])
    per_try = median([t.total_s for t in all_tries])
    print(
        f"\nNAT lab: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}; veths and iptables NAT in network "
        "namespaces, no added latency or loss"
    )
    print(
        f"{s.tries} tries per pair, each in a fresh lab with fresh nodes; "
        f"{s.jobs} lab(s) at once; bulk {s.bulk_bytes / MIB:.0f} MiB "
        f"(cap {s.bulk_cap:.0f} s; the relay's budget per circuit and way "
        f"{s.relay_bytes / MIB:.0f} MiB, default {RELAY_DEFAULT_BYTES / MIB:.0f}); load average before the run {load:.2f}; "
        f"whole run {elapsed:.0f} s (a try: {per_try:.1f} s median, "
        f"{setup:.1f} s of it lab + three nodes joined)\n"
    )
    print(f"polykey at {revision}\n")
    columns = ["expect", "path", "ok", "connect p50", "p95",
               "attempt p50", "p95", "relayed MiB/s", "direct MiB/s", "rel/dir"]  # fmt: skip
    print(format_table("A -> B (ms)", columns, rows))
    print(
        """
  expect: the path tests/natlab/test_nat_nodes.py requires. path: as A's
    ping reports it (a direct dial that got in through the hole B's punch
    had just opened counts as direct); a mix is shown with counts.
  connect: from A's ping request to its first verified connection to B (the
    nodesPingNode answer's connectMs: the search, the dial, punch or relay,
    the handshake and the check of B's certificate chain; not the ping).
  attempt: from the start of the attempt that won to the verified
    connection (attemptMs): for a punch, from A's signal request to the
    seed; for a relayed connection, from its circuit request (the finder
    tries the relay 1 s after the punch began); for a direct one, its dial.
  p50/p95: nearest rank over the tries that connected (of 5: the 3rd and
    the slowest).
  relayed / direct MiB/s: median over the relayed tries of a bulk transfer
    from A to a raw benchSink method (clock stops when the sink's count
    arrives): to B over the relayed connection, and to the seed over A's
    direct connection to it. "Direct on the same pair" is A's connection to
    the seed: B cannot be reached directly through these NATs, and the seed
    is the relay, so both transfers leave A through its NAT over the same
    first hop; the relayed one also crosses the seed and B's NAT, inside
    DATAGRAM frames (inner packets up to the relay's maxPacket, 1302
    bytes between our nodes, encrypted twice)."""
    )
    mismatch = [t for t in all_tries if t.ok and t.b_path != t.path]
    pooled = [t for t in all_tries if t.pooled]
    failed = [t for t in all_tries if not t.ok]
    if mismatch:
        print(f"  B saw another path than A in {len(mismatch)} tries: " + "; ".join(
            f"{label(*t.pair)} #{t.n}: A {t.path}, B {t.b_path}" for t in mismatch))  # fmt: skip
    if pooled:
        print(f"  {len(pooled)} tries found a pooled connection (not fresh)")
    for t in failed:
        print(f"  failed: {label(*t.pair)} #{t.n}: {t.error}")
    for t in all_tries:
        if t.bulk_error:
            print(f"  bulk failed: {label(*t.pair)} #{t.n}: {t.bulk_error}")
    print(
        "\n  samples, try by try: connect ms, path (d/p/r), attempt ms; relayed"
        " tries: bulk MiB/s, the relayed connection's packets lost, datagrams"
        " the relay dropped, and each connection's smoothed RTT and"
        " congestion window at the end of its transfer:"
    )
    for pair in results:
        cells = []
        for t in sorted(results[pair], key=lambda t: t.n):
            if not t.ok:
                cells.append("failed")
                continue
            attempt = f"/{t.attempt_ms:.1f}" if t.attempt_ms is not None else ""
            cells.append(f"{t.connect_ms:.1f} {(t.path or '?')[0]}{attempt}")
        bulk = []
        for t in sorted(results[pair], key=lambda t: t.n):
            if t.relayed_mibps is None or t.direct_mibps is None:
                continue
            lost, sent = t.relayed_loss or (0, 0)
            (r_rtt, r_cwnd), (d_rtt, d_cwnd) = t.bulk_paths or ((0, 0), (0, 0))
            bulk.append(
                f"\n      #{t.n} MiB/s {t.relayed_mibps:.1f} relayed ("
                f"{lost / max(sent, 1):.1%} lost, {t.relay_drops} dropped by the "
                f"relay, RTT {r_rtt:.0f} ms, cwnd {r_cwnd / MIB:.1f} MiB), "
                f"{t.direct_mibps:.1f} direct (RTT {d_rtt:.0f} ms, cwnd "
                f"{d_cwnd / MIB:.1f} MiB)"
            )
        extra = "".join(bulk)
        print(f"    {label(*pair)}: {', '.join(cells)}{extra}")
    verdict(results)
    print(f"\n  node logs: {s.work}")


def verdict(results: dict[tuple[NatType, NatType], list[Try]]) -> None:
    print("\ntargets:")
    connected = [p for p in results if all(t.ok for t in results[p])]
    tries = [t for ts in results.values() for t in ts]
    met = "met" if len(connected) == len(PAIRS) else "NOT met"
    print(
        f"  connected: {len(connected)}/{len(results)} pairs on every try "
        f"({sum(t.ok for t in tries)}/{len(tries)} tries); target 16/16: "
        + (met if len(results) == len(PAIRS) else "(not all pairs run)")
    )
    worst: tuple[float, str] | None = None
    pooled: list[float] = []
    for pair in results:
        after = [
            t.attempt_ms
            for t in results[pair]
            if t.ok and t.path == "punched" and t.attempt_ms is not None
        ]
        pooled += after
        if after:
            p95 = percentile(after, 95)
            if worst is None or p95 > worst[0]:
                worst = (p95, label(*pair))
    if worst is None:
        print("  punched: no punched tries")
    else:
        print(
            f"  punched, after the signal: p95 per pair at worst {worst[0]:.1f} ms "
            f"({worst[1]}), over all {len(pooled)} punched tries "
            f"{percentile(pooled, 95):.1f} ms; target under {PUNCH_TARGET_MS:.0f} ms: "
            + ("met" if worst[0] < PUNCH_TARGET_MS else "NOT met")
        )
    ratios: list[tuple[float, str]] = []
    for pair in results:
        relayed = [t.relayed_mibps for t in results[pair] if t.relayed_mibps]
        direct = [t.direct_mibps for t in results[pair] if t.direct_mibps]
        if relayed and direct:
            ratios.append((median(relayed) / median(direct), label(*pair)))
    if not ratios:
        print("  relayed bulk: no relayed transfers")
    else:
        low = min(ratios)
        print(
            f"  relayed bulk against direct: at worst {low[0]:.0%} ({low[1]}); "
            f"target at least {RELAY_TARGET:.0%}: "
            + ("met" if low[0] >= RELAY_TARGET else "NOT met")
        )


async def run_all(
    s: Settings, pairs: list[tuple[NatType, NatType]]
) -> dict[tuple[NatType, NatType], list[Try]]:
    results: dict[tuple[NatType, NatType], list[Try]] = {p: [] for p in pairs}
    # Try by try across the pairs: drift in the machine's speed over the run
    # spreads over every pair instead of landing on a few.
    queue = [(pair, n) for n in range(1, s.tries + 1) for pair in pairs]
    jobs = iter(queue)
    done = 0

    async def worker() -> None:
        nonlocal done
        for pair, n in jobs:
            t = await run_try(pair, n, s)
            results[pair].append(t)
            done += 1
            what = (
                f"{t.path} in {t.connect_ms:.1f} ms" if t.ok else f"FAILED: {t.error}"
            )
            print(
                f"bench: [{done}/{len(queue)}] {label(*pair)} #{n}: {what} "
                f"(lab {t.phases[0]:.1f} s, loaded {t.phases[1]:.1f} s, joined "
                f"{t.phases[2]:.1f} s, setup {t.setup_s:.1f} s, try {t.total_s:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    async with trio.open_nursery() as nursery:
        for _ in range(s.jobs):
            nursery.start_soon(worker)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=5, help="tries per pair (5)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="labs at once (1: timings are honest)"
    )
    parser.add_argument(
        "--bulk-mib",
        type=float,
        default=128,
        help="bulk transfer size in MiB (128; 0: none); the seed's relay budget"
        " per circuit is raised to twice that",
    )
    parser.add_argument(
        "--bulk-cap", type=float, default=15.0, help="stop a bulk send after S s (15)"
    )
    parser.add_argument(
        "--only",
        help="only pairs with this NAT type on either side "
        "(none, full-cone, port-restricted, symmetric)",
    )
    args = parser.parse_args()
    available, why = lab_available()
    if not available:
        sys.exit(f"bench/nat.py: {why}")
    pairs = PAIRS
    if args.only:
        only = NatType(args.only)
        pairs = [p for p in PAIRS if only in p]
    work = Path(tempfile.mkdtemp(prefix="pk-benchnat-"))
    settings = Settings(
        tries=args.tries,
        jobs=args.jobs,
        bulk_bytes=int(args.bulk_mib * MIB),
        relay_bytes=max(RELAY_DEFAULT_BYTES, 2 * int(args.bulk_mib * MIB)),
        bulk_cap=args.bulk_cap,
        work=work,
    )
    load = os.getloadavg()[0]
    revision = polykey_revision()
    started = time.monotonic()
    try:
        results = trio.run(run_all, settings, pairs)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup)
            and exc.split(KeyboardInterrupt)[0] is not None
        )
        if not interrupted:
            raise
        # Every lab, and the nodes in it, is gone: NatLab cleaned up.
        sys.exit(f"bench/nat.py: interrupted; node logs in {work}")
    elapsed = time.monotonic() - started
    report(results, settings, load, elapsed, revision)


if __name__ == "__main__":
    main()
