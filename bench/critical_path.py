"""Where one call's time goes when client and server are separate processes:
each side's wake-up, from the datagram's arrival to the one it sends.

    .venv/bin/python bench/critical_path.py              # unary, 1 in flight
    .venv/bin/python bench/critical_path.py --row rr     # bare QUIC round trip

At one call in flight a call is a chain: the client's wake-up ends in the
request's ``sendto``, the server's wake-up ends in the reply's, and each
waits for the other. What a side does before its ``sendto`` is on that
chain; what it does after (closing the stream, ending the task) runs
while the other side works. bench/rpc.py's peers (bench/_rpc_polykey.py; for
``rr`` bench/_quic_polykey.py, bench/quic.py's row) run pinned as
bench/rpc.py pins them, each under bench/_probe.py, which notes when each
step of a wake-up first happened after trio's poll returned.

Prints, per side, the median time of each step (those in most wake-ups),
then the chain: both sides' time to their send, and what is left of a
round trip for the kernel and the two processes' wake-ups. The probe's
marks cost about a microsecond each, so the rate is below bench/rpc.py's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _util import BENCH_DIR, PYTHON, run_client_against_server

_SEND = ("sendto called", "sendmsg called")


def _peer_cmd(out: Path, script: str, *args: str) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "_probe.py"),
        str(out),
        str(BENCH_DIR / script),
        *args,
    ]


def _timeline(path: Path) -> tuple[int, list[tuple[float, str, float]], float]:
    """The wake-ups counted, (median us, step, share of wake-ups) by time,
    and the median time to the first send."""
    data = json.loads(path.read_text())
    wakeups: int = data["wakeups"]
    rows = []
    for name, values in data["samples"].items():
        share = len(values) / max(1, wakeups)
        if share >= 0.5:
            rows.append((statistics.median(values) * 1e6, name, share))
    rows.sort()
    to_send = min((us for us, name, _ in rows if name in _SEND), default=float("nan"))
    return wakeups, rows, to_send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", choices=["unary", "rr"], default="unary")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args()
    script = "_rpc_polykey.py" if args.row == "unary" else "_quic_polykey.py"
    client_args = ["--mode", args.row, "--seconds", str(args.seconds)]
    if args.row == "unary":
        client_args += ["--in-flight", "1"]
    with tempfile.TemporaryDirectory(prefix="critical-path-") as tmp:
        outs = {side: Path(tmp) / f"{side}.json" for side in ("server", "client")}
        result = run_client_against_server(
            _peer_cmd(outs["server"], script, "server"),
            lambda port: _peer_cmd(
                outs["client"], script, "client", str(port), *client_args
            ),
            log_dir=Path(tmp),
            pin=not args.no_pin,
            timeout=args.seconds + 60,
        )
        rate = result["per_s"]
        chain = {}
        for side in ("client", "server"):
            wakeups, rows, to_send = _timeline(outs[side])
            chain[side] = to_send
            print(
                f"{side}: {wakeups} wake-ups that sent; median us after the poll returned"
            )
            for us, name, share in rows:
                note = "" if share >= 0.99 else f"  ({share:.0%} of them)"
                print(f"  {us:8.1f}  {name}{note}")
    round_trip = 1e6 / rate
    rest = round_trip - chain["client"] - chain["server"]
    print(
        f"{args.row}: {rate:,.0f} round trips/s, {round_trip:.0f} us each: the client's "
        f"{chain['client']:.0f} us to its send, the server's {chain['server']:.0f}, "
        f"and {rest:.0f} us for the sends themselves, the kernel and the two wake-ups"
    )


if __name__ == "__main__":
    sys.exit(main())
