"""QUIC benchmark: polykey vs aioquic vs @matrixai/quic vs native quiche
(and bare UDP on trio, the floor under the round-trip row).

    .venv/bin/python bench/quic.py                 # the full run (a few minutes)
    .venv/bin/python bench/quic.py --quick         # smoke run
    .venv/bin/python bench/quic.py --only polykey,native --size 1073741824

One run on loopback prints one table: rows are metrics, columns are
implementations. Every implementation runs its server and its client as
separate processes (the server pinned to CPU 0, the client to CPU 1 with
taskset), speaking the same echo protocol (bench/_util.py). What each number
means and the caveats: bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _util import (
    BENCH_DIR,
    CLIENT_CPU,
    PYTHON,
    ROOT,
    SERVER_CPU,
    Peer,
    PeerError,
    PeerRunner,
    ensure_js,
    format_table,
    make_certificate,
    polykey_revision,
    rss_kib,
)

NATIVE_DIR = BENCH_DIR / "native"
NATIVE_TARGET = Path(
    os.environ.get(
        "POLYKEY_BENCH_NATIVE_TARGET",
        Path.home() / ".cache" / "polykey" / "bench-native",
    )
)
NATIVE_BIN = NATIVE_TARGET / "release" / "bench-native"


@dataclass
class Settings:
    size: int
    bulk_cap: float
    seconds: float
    conns: int
    concurrency: int
    idle_limit: float
    repeat: int
    pin: bool
    settle: float
    cert: Path
    key: Path
    log_dir: Path
    profile_dir: Path | None


@dataclass
class Impl:
    key: str
    label: str
    retry: bool
    server: Callable[[Settings, bool], list[str]]
    client: Callable[[Settings, int, str], list[str]]
    cwd: Path = ROOT
    #: The rows it is measured on (the others show "n/a").
    modes: tuple[str, ...] = ("bulk", "rr", "hs", "idle")


def _client_options(s: Settings, mode: str) -> list[str]:
    """The options the Python and native clients take alike."""
    return [
        "--mode",
        mode,
        "--size",
        str(s.size),
        "--max-seconds",
        str(s.bulk_cap),
        "--seconds",
        str(s.seconds),
        "--count",
        str(s.conns),
        "--concurrency",
        str(s.concurrency),
        "--idle-limit",
        str(s.idle_limit),
    ]


def _py_client(script: str) -> Callable[[Settings, int, str], list[str]]:
    def cmd(s: Settings, port: int, mode: str) -> list[str]:
        return [
            PYTHON,
            str(BENCH_DIR / script),
            "client",
            str(port),
            *_client_options(s, mode),
        ]

    return cmd


def _polykey_server(s: Settings, profile: bool) -> list[str]:
    cmd = [PYTHON, str(BENCH_DIR / "_quic_polykey.py"), "server"]
    if profile and s.profile_dir is not None:
        cmd += ["--profile", str(s.profile_dir / "polykey-server.prof")]
    return cmd


def _aioquic_server(s: Settings, profile: bool) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "_quic_aioquic.py"),
        "server",
        "--cert",
        str(s.cert),
        "--key",
        str(s.key),
    ]


def _js_server(s: Settings, profile: bool) -> list[str]:
    return ["node", "quic_peer.mjs", "server", str(s.cert), str(s.key)]


def _js_client(s: Settings, port: int, mode: str) -> list[str]:
    args = {
        "bulk": [str(s.size), str(s.bulk_cap)],
        "rr": [str(s.seconds)],
        "hs": [str(s.seconds)],
        "idle": [str(s.conns), str(s.concurrency), str(s.idle_limit)],
    }[mode]
    return ["node", "quic_peer.mjs", "client", str(port), mode, *args]


def _native_server(s: Settings, profile: bool) -> list[str]:
    return [str(NATIVE_BIN), "server", "--cert", str(s.cert), "--key", str(s.key)]


def _native_client(s: Settings, port: int, mode: str) -> list[str]:
    return [
        str(NATIVE_BIN),
        "client",
        "--connect",
        f"127.0.0.1:{port}",
        *_client_options(s, mode),
    ]


IMPLS = {
    "polykey": Impl(
        "polykey", "polykey", True, _polykey_server, _py_client("_quic_polykey.py")
    ),
    "aioquic": Impl(
        "aioquic", "aioquic", False, _aioquic_server, _py_client("_quic_aioquic.py")
    ),
    "js": Impl("js", "@matrixai/quic", True, _js_server, _js_client, BENCH_DIR / "js"),
    "native": Impl("native", "native quiche", True, _native_server, _native_client),
    # Not QUIC: the floor under the round-trip row for anything driven by trio.
    "udp": Impl(
        "udp",
        "trio UDP (no QUIC)",
        False,
        lambda s, profile: [PYTHON, str(BENCH_DIR / "_udp_trio.py"), "server"],
        _py_client("_udp_trio.py"),
        modes=("rr",),
    ),
}
ALIASES = {
    "js-quic": "js",
    "@matrixai/quic": "js",
    "matrixai": "js",
    "quiche": "native",
}

METRICS = [
    ("bulk", "bulk, one stream (MiB/s)"),
    ("rr", "new-stream 100 B round trips (/s)"),
    ("hs", "sequential handshakes (/s)"),
    ("idle", "server RSS per idle connection (KiB)"),
]


def build_native() -> None:
    if not (ROOT / "_quiche_build" / "vendor" / "quiche").exists():
        raise SystemExit(
            "bench: _quiche_build/vendor/quiche is missing: build polykey first "
            "(make setup)"
        )
    env = dict(os.environ, CARGO_TARGET_DIR=str(NATIVE_TARGET))
    print(
        "bench: cargo build --release (bench/native) ...", file=sys.stderr, flush=True
    )
    subprocess.run(
        ["cargo", "build", "--release", "--quiet"], cwd=NATIVE_DIR, env=env, check=True
    )


class Runner(PeerRunner):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.s = settings

    def start_server(self, impl: Impl, *, profile: bool = False) -> tuple[Peer, int]:
        for attempt in (1, 2):  # a stalled machine gets a second chance
            server = self._peer(
                impl, "server", impl.server(self.s, profile), SERVER_CPU
            )
            server.start()
            try:
                return server, server.wait_ready(60)
            except PeerError as exc:
                server.stop()
                if attempt == 2:
                    raise PeerError(
                        f"server did not start: {exc}: {server.log_tail()}"
                    ) from exc
        raise AssertionError("unreachable")

    def client(self, impl: Impl, port: int, mode: str) -> Peer:
        cmd = impl.client(self.s, port, mode)
        if mode == "bulk" and impl.key == "polykey" and self.s.profile_dir is not None:
            cmd += ["--profile", str(self.s.profile_dir / "polykey-client.prof")]
        return self._peer(impl, mode, cmd, CLIENT_CPU).start()

    def simple(self, impl: Impl, port: int, mode: str) -> dict[str, Any]:
        timeout = {
            "bulk": self.s.bulk_cap + 60,
            "rr": self.s.seconds + 60,
            "hs": self.s.seconds + 60,
        }[mode]
        client = self.client(impl, port, mode)
        try:
            return client.read_json(timeout)
        except PeerError as exc:
            raise PeerError(f"{exc}: {client.log_tail()}") from exc
        finally:
            client.stop()

    def idle(self, impl: Impl) -> dict[str, Any]:
        server, port = self.start_server(impl)
        client = self.client(impl, port, "idle")
        try:
            while client.readline(60).strip() != "WARM":
                pass
            time.sleep(self.s.settle)
            before = rss_kib(server.pid)
            client.send_line("go")
            result = client.read_json(400)
            time.sleep(2 * self.s.settle)  # let the last handshakes settle
            after = rss_kib(server.pid)
            n = int(result["connected"])
            result.update(
                rss_before_kib=before,
                rss_after_kib=after,
                per_conn_kib=(after - before) / n if n else float("nan"),
            )
            return result
        except PeerError as exc:
            raise PeerError(f"{exc}: {client.log_tail()} {server.log_tail()}") from exc
        finally:
            client.stop()
            server.stop()

    def run_modes(self, impl: Impl, modes: list[str], cells: dict[str, str]) -> None:
        """Measure ``modes`` for ``impl`` into ``cells`` (metric -> cell)."""
        for mode in modes:
            if mode not in impl.modes:
                cells[mode] = "n/a"
                continue
            if mode == "idle":
                self.run_idle(impl, cells)
                continue
            # A fresh server per metric: no state carried over, and a
            # profile (--profile) that covers the bulk runs alone. The client
            # runs `repeat` times against it; the table shows the median.
            t0 = time.monotonic()
            results: list[dict[str, Any]] = []
            try:
                server, port = self.start_server(impl, profile=mode == "bulk")
                try:
                    for _ in range(self.s.repeat):
                        results.append(self.simple(impl, port, mode))
                finally:
                    server.stop()
            except PeerError as exc:
                self.notes.append(f"{impl.label} {mode}: {exc}")
                if not results:
                    cells[mode] = "error"
                    continue
            took = time.monotonic() - t0
            field = "mib_s" if mode == "bulk" else "per_s"
            values = sorted(r[field] for r in results)
            median = statistics.median(values)
            cells[mode] = f"{median:,.1f}" if mode == "bulk" else f"{median:,.0f}"
            if mode == "bulk" and any(r.get("capped") for r in results):
                cells[mode] += "*"
                r = results[-1]
                self.notes.append(
                    f"* {impl.label} bulk: time cap hit, {r['bytes'] / 2**20:.0f} "
                    f"MiB in {r['seconds']:.1f} s"
                )
            if len(values) > 1:
                self.samples.append(
                    f"{impl.label} {mode}: "
                    + " / ".join(
                        f"{v:,.1f}" if mode == "bulk" else f"{v:,.0f}" for v in values
                    )
                )
            print(
                f"bench: {impl.label} {mode}: {results} ({took:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    def run_idle(self, impl: Impl, cells: dict[str, str]) -> None:
        try:
            r = self.idle(impl)
            print(f"bench: {impl.label} idle: {r}", file=sys.stderr, flush=True)
            cells["idle"] = f"{r['per_conn_kib']:.1f}"
            if r["connected"] < self.s.conns:
                cells["idle"] += f" @{r['connected']}"
                self.notes.append(
                    f"{impl.label}: reached {r['connected']} of {self.s.conns} "
                    f"connections ({r.get('failed', 0)} failed)"
                )
            self.notes.append(
                f"{impl.label} idle: server RSS {r['rss_before_kib'] / 1024:.1f} -> "
                f"{r['rss_after_kib'] / 1024:.1f} MiB, {r['connected']} connections "
                f"opened in {r['seconds']:.1f} s"
            )
        except PeerError as exc:
            cells["idle"] = "error"
            self.notes.append(f"{impl.label} idle: {exc}")


def print_profiles(profile_dir: Path) -> None:
    for name in ("polykey-server.prof", "polykey-client.prof"):
        path = profile_dir / name
        if not path.exists():
            continue
        print(f"\n--- cProfile {name} (bulk run), top 15 by internal time ---")
        stats = pstats.Stats(str(path))
        stats.sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        help="comma-separated subset of: polykey, aioquic, js (@matrixai/quic), "
        "native, udp (bare UDP on trio: the floor under the round-trip row)",
    )
    parser.add_argument(
        "--rows", help="comma-separated subset of the rows: bulk, rr, hs, idle"
    )
    parser.add_argument("--size", type=int, help="bulk bytes (default 1 GiB)")
    parser.add_argument(
        "--bulk-cap", type=float, help="stop a bulk send after this many seconds (15)"
    )
    parser.add_argument(
        "--seconds", type=float, help="round trips / handshakes run time (3)"
    )
    parser.add_argument("--conns", type=int, help="idle connections (5000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="handshakes in flight while opening idle connections",
    )
    parser.add_argument(
        "--repeat", type=int, help="client runs per metric, median shown (3)"
    )
    parser.add_argument(
        "--idle-limit",
        type=float,
        default=240.0,
        help="give up opening idle connections after this many seconds",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--no-build", action="store_true", help="skip cargo build")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile polykey's bulk server and client into DIR and print the top 15",
    )
    args = parser.parse_args()

    quick = args.quick
    keys = ["polykey", "aioquic", "js", "native", "udp"]
    if args.only:
        keys = []
        for name in args.only.split(","):
            key = ALIASES.get(name.strip(), name.strip())
            if key not in IMPLS:
                parser.error(f"unknown implementation {name!r}")
            keys.append(key)
    metrics = METRICS
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        metrics = [(m, label) for m, label in METRICS if m in wanted]
        if len(metrics) != len(wanted):
            parser.error(f"unknown rows in {args.rows!r}")
    workdir = Path(tempfile.mkdtemp(prefix="polykey-bench-quic-"))
    cert, key = make_certificate(workdir)
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        size=args.size or (8 * 2**20 if quick else 2**30),
        bulk_cap=args.bulk_cap or (2.0 if quick else 15.0),
        seconds=args.seconds or (0.5 if quick else 3.0),
        conns=args.conns or (50 if quick else 5000),
        concurrency=args.concurrency,
        idle_limit=args.idle_limit,
        repeat=args.repeat or (1 if quick else 3),
        pin=not args.no_pin and len(os.sched_getaffinity(0)) >= 2,
        settle=0.2 if quick else 1.0,
        cert=cert,
        key=key,
        log_dir=workdir,
        profile_dir=profile_dir,
    )
    if "native" in keys and not args.no_build:
        build_native()
    if "js" in keys:
        ensure_js()

    load = os.getloadavg()[0]
    revision = polykey_revision()
    started = time.monotonic()
    runner = Runner(settings)
    # Row by row, each implementation in turn, so that a row compares runs
    # made close together (this machine's speed drifts over minutes).
    columns: dict[str, dict[str, str]] = {k: {} for k in keys}
    for mode, _ in metrics:
        for k in keys:
            runner.run_modes(IMPLS[k], [mode], columns[k])
    elapsed = time.monotonic() - started

    rows: list[tuple[str, list[str]]] = []
    for mode, label in metrics:
        if mode == "idle":
            label = f"server RSS per idle conn, {settings.conns} open (KiB)"
        rows.append((label, [columns[k].get(mode, "-") for k in keys]))
    rows.append(
        (
            "Retry on each new connection",
            [
                ("yes" if IMPLS[k].retry else "no") if "hs" in IMPLS[k].modes else "n/a"
                for k in keys
            ],
        )
    )
    print(
        f"\nQUIC on loopback: {platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Linux {platform.release()}; server on CPU "
        f"{SERVER_CPU}, client on CPU {CLIENT_CPU}"
        + ("" if settings.pin else " (not pinned)")
    )
    print(
        f"median of {settings.repeat} client runs for the first three rows; "
        f"bulk {settings.size / 2**20:.0f} MiB (cap {settings.bulk_cap:.0f} s), "
        f"round trips and handshakes {settings.seconds:g} s each, "
        f"{settings.conns} idle connections; load average before the run "
        f"{load:.2f}; whole run {elapsed:.0f} s\n"
    )
    print(f"polykey at {revision}\n")
    print(format_table("metric", [IMPLS[k].label for k in keys], rows))
    if runner.notes or runner.samples:
        print()
        for note in runner.notes:
            print(f"  {note}")
        if runner.samples:
            print("  samples: " + "; ".join(runner.samples))
    print(f"\n  peer logs: {workdir}")
    if profile_dir is not None:
        print_profiles(profile_dir)


if __name__ == "__main__":
    main()
