"""RPC benchmark: polykey RPC over polykey QUIC vs grpcio vs @matrixai/rpc.

    .venv/bin/python bench/rpc.py              # the full run (about a minute)
    .venv/bin/python bench/rpc.py --quick      # smoke run
    .venv/bin/python bench/rpc.py --only polykey,grpc

One run on loopback prints one table: unary calls per second with one call
in flight and with 64 in flight, the same with a handler that waits once
before it answers (as one doing I/O does; not @matrixai/rpc's), messages
per second of one
server-streaming call, and first contact: p50 / p95 milliseconds from a
fresh client's dial to the reply of its one unary call (polykey: a new
node identity and socket per try, both sides verifying node certificates;
grpcio: a new channel per try, TLS verifying the server only). Servers and clients are separate processes (server on
CPU 0, client on CPU 1). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import pstats
import statistics
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
    PeerError,
    PeerRunner,
    ensure_js,
    format_table,
    make_certificate,
    polykey_revision,
)


@dataclass
class Settings:
    seconds: float
    repeat: int
    messages: int
    stream_cap: float
    tries: int
    pin: bool
    cert: Path
    key: Path
    log_dir: Path
    profile_dir: Path | None


@dataclass
class Impl:
    key: str
    label: str
    server: Callable[[Settings, str | None], list[str]]
    client: Callable[[Settings, int, str, int], list[str]]
    cwd: Path = ROOT


def _polykey_server(s: Settings, profile: str | None) -> list[str]:
    cmd = [PYTHON, str(BENCH_DIR / "_rpc_polykey.py"), "server"]
    if profile and s.profile_dir is not None:
        cmd += ["--profile", str(s.profile_dir / f"rpc-polykey-server-{profile}.prof")]
    return cmd


def _client_options(s: Settings, mode: str, in_flight: int) -> list[str]:
    """The options both Python clients take."""
    return [
        "--mode",
        mode,
        "--seconds",
        str(s.seconds),
        "--in-flight",
        str(in_flight),
        "--messages",
        str(s.messages),
        "--max-seconds",
        str(s.stream_cap),
        "--tries",
        str(s.tries),
    ]


def _polykey_client(s: Settings, port: int, mode: str, in_flight: int) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "_rpc_polykey.py"),
        "client",
        str(port),
        *_client_options(s, mode, in_flight),
    ]


def _grpc_server(s: Settings, profile: str | None) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "_rpc_grpc.py"),
        "server",
        "--cert",
        str(s.cert),
        "--key",
        str(s.key),
    ]


def _grpc_client(s: Settings, port: int, mode: str, in_flight: int) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "_rpc_grpc.py"),
        "client",
        str(port),
        "--cert",
        str(s.cert),
        *_client_options(s, mode, in_flight),
    ]


def _js_server(s: Settings, profile: str | None) -> list[str]:
    return ["node", "rpc_peer.mjs", "server", str(s.cert), str(s.key)]


def _js_client(s: Settings, port: int, mode: str, in_flight: int) -> list[str]:
    if mode == "unary":
        args = [str(s.seconds), str(in_flight)]
    else:
        args = [str(s.messages), str(s.stream_cap)]
    return ["node", "rpc_peer.mjs", "client", str(port), mode, *args]


IMPLS = {
    "polykey": Impl("polykey", "polykey (QUIC)", _polykey_server, _polykey_client),
    "grpc": Impl("grpc", "grpcio (HTTP/2+TLS)", _grpc_server, _grpc_client),
    "js": Impl(
        "js", "@matrixai/rpc (js-quic)", _js_server, _js_client, BENCH_DIR / "js"
    ),
}
ALIASES = {"grpcio": "grpc", "js-rpc": "js", "@matrixai/rpc": "js", "matrixai": "js"}

METRICS = [
    ("unary1", "unary", 1, "unary calls/s, 1 in flight"),
    ("unary64", "unary", 64, "unary calls/s, 64 in flight"),
    ("wait1", "unary_wait", 1, "unary, handler waits once, 1 in flight"),
    ("wait64", "unary_wait", 64, "unary, handler waits once, 64 in flight"),
    ("stream", "stream", 1, "server-streaming messages/s"),
    ("first", "first", 1, "first contact, p50 / p95 ms"),
]


class Runner(PeerRunner):
    prefix = "rpc-"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.s = settings

    def one(
        self, impl: Impl, metric: str, mode: str, in_flight: int
    ) -> list[dict[str, Any]]:
        profile = metric if impl.key == "polykey" and self.s.profile_dir else None
        server = self._peer(impl, "server", impl.server(self.s, profile), SERVER_CPU)
        server.start()
        try:
            try:
                port = server.wait_ready(60)
            except PeerError as exc:
                raise PeerError(
                    f"server did not start: {exc}: {server.log_tail()}"
                ) from exc
            results = []
            for run in range(self.s.repeat):
                cmd = impl.client(self.s, port, mode, in_flight)
                if profile and self.s.profile_dir is not None and run == 0:
                    prof = self.s.profile_dir / f"rpc-polykey-client-{metric}.prof"
                    cmd += ["--profile", str(prof)]
                client = self._peer(impl, metric, cmd, CLIENT_CPU).start()
                try:
                    timeout = max(self.s.seconds, self.s.stream_cap) + 60
                    results.append(client.read_json(timeout))
                except PeerError as exc:
                    raise PeerError(f"{exc}: {client.log_tail()}") from exc
                finally:
                    client.stop()
            return results
        finally:
            server.stop()

    def run_metric(
        self, impls: list[Impl], metric: str, mode: str, in_flight: int
    ) -> dict[str, str]:
        """One row: each implementation in turn, back to back, so that a
        row compares runs made under the same conditions (this machine's
        speed drifts by tens of percent over minutes)."""
        cells: dict[str, str] = {}
        for impl in impls:
            if mode in ("first", "unary_wait") and impl.key == "js":
                # Not built: rpc_peer.mjs has no first-contact client, nor
                # a handler that waits.
                cells[impl.key] = "-"
                continue
            t0 = time.monotonic()
            try:
                results = self.one(impl, metric, mode, in_flight)
            except PeerError as exc:
                cells[impl.key] = "error"
                self.notes.append(f"{impl.label} {metric}: {exc}")
                continue
            if mode == "first":
                p50 = statistics.median(r["p50_ms"] for r in results)
                p95 = statistics.median(r["p95_ms"] for r in results)
                cells[impl.key] = f"{p50:.2f} / {p95:.2f}"
                if len(results) > 1:
                    self.samples.append(
                        f"{impl.label} {metric} p50: "
                        + " / ".join(f"{r['p50_ms']:.2f}" for r in results)
                    )
            else:
                values = sorted(r["per_s"] for r in results)
                cells[impl.key] = f"{statistics.median(values):,.0f}"
                if len(values) > 1:
                    self.samples.append(
                        f"{impl.label} {metric}: "
                        + " / ".join(f"{v:,.0f}" for v in values)
                    )
            per_call = [
                r["datagrams_per_call"] for r in results if "datagrams_per_call" in r
            ]
            if per_call:
                self.notes.append(
                    f"{impl.label} {metric}: "
                    f"{statistics.median(per_call):.2f} UDP datagrams per call (both ways)"
                )
            capped = [r for r in results if r.get("capped")]
            if capped:
                cells[impl.key] += "*"
                self.notes.append(
                    f"* {impl.label}: stream stopped at the time cap after "
                    f"{capped[-1]['count']:,} messages"
                )
            errors = sum(int(r.get("errors") or 0) for r in results)
            if errors:
                cells[impl.key] += "!"
                last = next(r["last_error"] for r in results if r.get("errors"))
                self.notes.append(
                    f"! {impl.label} {metric}: {errors} failed calls ({last})"
                )
            print(
                f"bench: {impl.label} {metric}: {results} "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="comma-separated subset of: polykey, grpc, js (@matrixai/rpc)"
    )
    parser.add_argument("--seconds", type=float, help="run time of each unary run (3)")
    parser.add_argument(
        "--messages", type=int, help="messages in the streaming call (100000)"
    )
    parser.add_argument(
        "--stream-cap", type=float, help="stop the streaming call after this long (10)"
    )
    parser.add_argument(
        "--repeat", type=int, help="client runs per metric, median shown (3)"
    )
    parser.add_argument("--tries", type=int, help="first contacts per client run (200)")
    parser.add_argument(
        "--rows",
        help="comma-separated subset of the rows: unary1, unary64, wait1, wait64, "
        "stream, first",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile polykey's server and client into DIR; print each top 15",
    )
    args = parser.parse_args()
    quick = args.quick
    keys = ["polykey", "grpc", "js"]
    if args.only:
        keys = []
        for name in args.only.split(","):
            key = ALIASES.get(name.strip(), name.strip())
            if key not in IMPLS:
                parser.error(f"unknown implementation {name!r}")
            keys.append(key)
    workdir = Path(tempfile.mkdtemp(prefix="polykey-bench-rpc-"))
    cert, key = make_certificate(workdir)
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        seconds=args.seconds or (1.0 if quick else 3.0),
        repeat=args.repeat or (1 if quick else 3),
        messages=args.messages or (5_000 if quick else 100_000),
        stream_cap=args.stream_cap or (2.0 if quick else 10.0),
        tries=args.tries or (30 if quick else 200),
        pin=not args.no_pin and len(os.sched_getaffinity(0)) >= 2,
        cert=cert,
        key=key,
        log_dir=workdir,
        profile_dir=profile_dir,
    )
    if "js" in keys:
        ensure_js()
    load = os.getloadavg()[0]
    revision = polykey_revision()
    started = time.monotonic()
    runner = Runner(settings)
    impls = [IMPLS[k] for k in keys]
    rows = []
    metrics = METRICS
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")}
        if wanted - {m[0] for m in METRICS}:
            parser.error(f"unknown rows in {args.rows!r}")
        metrics = [m for m in METRICS if m[0] in wanted]
    for metric, mode, in_flight, label in metrics:
        cells = runner.run_metric(impls, metric, mode, in_flight)
        rows.append((label, [cells.get(k, "-") for k in keys]))
    elapsed = time.monotonic() - started
    print(
        f"\nRPC on loopback: {platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; server on CPU {SERVER_CPU}, client on CPU "
        f"{CLIENT_CPU}" + ("" if settings.pin else " (not pinned)")
    )
    print(
        f"median of {settings.repeat} client runs; "
        f"unary runs {settings.seconds:g} s each, streaming call of "
        f"{settings.messages:,} messages (cap {settings.stream_cap:g} s); "
        f"{settings.tries} first contacts per client run; "
        f"load average before the run {load:.2f}; whole run {elapsed:.0f} s\n"
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
        for path in sorted(profile_dir.glob("rpc-polykey-*.prof")):
            print(f"\n--- cProfile {path.name}, top 15 by internal time ---")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
