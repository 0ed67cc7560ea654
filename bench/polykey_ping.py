"""Polykey's own agent on the first-contact row: ``pingNodeAddress`` to a
node it has never seen (bench/README.md).

    sudo .venv/bin/python bench/polykey_ping.py [--targets 8] [--pingers 3]

Starts ``--targets`` Polykey 1.15 agents (tests/interop/polykey/agent.mjs),
then, one after another, ``--pingers`` fresh agents, each of which pings
every target once by NodeId and address: each ping is a first contact (a
QUIC connection, both certificate checks; Polykey's ping makes no RPC),
timed inside the pinging agent, after ``--settle`` seconds for start-up work. Prints p50/p95 in ms. Needs root: it runs
itself in a private network namespace (``unshare -n``), as the interop tests
do, because an agent's mDNS binds every interface.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.interop.polykey.agents import running_agent  # noqa: E402

_INSIDE = "POLYKEY_PING_NETNS"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace, state: Path) -> None:
    await trio.run_process(["ip", "link", "set", "lo", "up"])
    times: list[float] = []
    failed = 0
    async with trio.open_nursery() as nursery:
        targets = []

        async def hold(i: int, task_status: trio.TaskStatus[None]) -> None:
            async with running_agent(state / f"target{i}") as agent:
                targets.append(agent)
                task_status.started()
                await trio.sleep_forever()

        # One at a time: agents starting at once on two busy cores time out
        # starting their workers.
        for i in range(args.targets):
            await nursery.start(hold, i)
        # A fresh agent's start-up work (its node graph, seed dials) settles.
        await trio.sleep(args.settle)
        for p in range(args.pingers):
            async with running_agent(state / f"pinger{p}") as pinger:
                await trio.sleep(args.settle)
                for target in targets:
                    host, port = target.address
                    answer = await pinger.command(
                        {
                            "op": "ping",
                            "nodeId": target.info["nodeId"],
                            "host": host,
                            "port": port,
                        }
                    )
                    if answer.get("ok"):
                        times.append(float(answer["ms"]))
                    else:
                        failed += 1
                    print(f"pinger {p}: {answer}", file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()
    if times:
        print(
            f"Polykey 1.15 pingNodeAddress, first contact on loopback: "
            f"{len(times)} pings ({failed} failed), p50 "
            f"{statistics.median(times):.1f} ms, p95 {_percentile(times, 0.95):.1f} "
            f"ms, min {min(times):.1f}, max {max(times):.1f}"
        )
    else:
        print(f"no ping succeeded ({failed} failed)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--pingers", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after an agent starts"
    )
    arguments = parser.parse_args()
    if os.environ.get(_INSIDE) != "1":
        env = dict(os.environ, **{_INSIDE: "1"})
        sys.exit(subprocess.call(["unshare", "-n", sys.executable, *sys.argv], env=env))
    with tempfile.TemporaryDirectory(prefix="polykey-ping-") as tmp:
        trio.run(main, arguments, Path(tmp))
