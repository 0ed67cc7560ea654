"""This tree against another on one row of bench/rpc.py or bench/quic.py, in
alternating pairs: the ratio pair by pair, so a comparison survives the
machine's drift (this 2-core machine's speed wanders by up to 2x between
runs of one build).

    .venv/bin/python bench/pairs.py /tmp/old                  # unary1, 10 pairs
    .venv/bin/python bench/pairs.py /tmp/old --row rr --pairs 20 --seconds 1

``/tmp/old`` is another checkout (``git worktree add /tmp/old REV``) with
its extension built, or copied in when its C is the same
(``polykey/quic/_quiche.abi3.so``). Each run is a fresh server and client
of that tree's own bench/_rpc_polykey.py (``rr``: bench/_quic_polykey.py),
pinned as bench/rpc.py pins them, with the tree first on ``PYTHONPATH``;
a pair runs both trees, in an order that alternates from pair to pair.

Prints each tree's rates, sorted, then this/other pair by pair and the
median: a median that the spread of the pairs does not cover is a
difference; one inside it is not resolved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _util import PYTHON, ROOT, run_client_against_server

#: row -> (peer script, client arguments)
ROWS: dict[str, tuple[str, list[str]]] = {
    "unary1": ("_rpc_polykey.py", ["--mode", "unary", "--in-flight", "1"]),
    "unary64": ("_rpc_polykey.py", ["--mode", "unary", "--in-flight", "64"]),
    "wait1": ("_rpc_polykey.py", ["--mode", "unary_wait", "--in-flight", "1"]),
    "wait64": ("_rpc_polykey.py", ["--mode", "unary_wait", "--in-flight", "64"]),
    "rr": ("_quic_polykey.py", ["--mode", "rr"]),
}


def _run(tree: Path, row: str, seconds: float, pin: bool, log_dir: Path) -> float:
    """One server and client of ``tree``'s own peers: the client's rate."""
    script, options = ROWS[row]
    bench = tree / "bench"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = run_client_against_server(
        [PYTHON, str(bench / script), "server"],
        lambda port: [
            PYTHON,
            str(bench / script),
            "client",
            str(port),
            *options,
            "--seconds",
            str(seconds),
        ],
        log_dir=log_dir,
        pin=pin,
        cwd=tree,
        env=env,
        timeout=seconds + 60,
    )
    rate: float = result["per_s"]
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout")
    parser.add_argument("--row", choices=sorted(ROWS), default="unary1")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args()
    other = args.other.resolve()
    if not (other / "bench" / ROWS[args.row][0]).exists():
        sys.exit(f"{other} has no bench/{ROWS[args.row][0]}")
    this_rates, other_rates, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="pairs-") as tmp:
        for i in range(args.pairs):
            order = [ROOT, other] if i % 2 == 0 else [other, ROOT]
            got = {
                tree: _run(tree, args.row, args.seconds, not args.no_pin, Path(tmp))
                for tree in order
            }
            this_rates.append(got[ROOT])
            other_rates.append(got[other])
            ratios.append(got[ROOT] / got[other])
    print(f"{args.row}, {args.pairs} pairs of {args.seconds:g} s each")
    print(
        f"  this tree ({ROOT}): " + ", ".join(f"{r:,.0f}" for r in sorted(this_rates))
    )
    print(f"  other ({other}): " + ", ".join(f"{r:,.0f}" for r in sorted(other_rates)))
    print("  this/other: " + ", ".join(f"{r:.2f}" for r in ratios))
    print(
        f"  median {statistics.median(ratios):.3f} "
        f"(pairs {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
