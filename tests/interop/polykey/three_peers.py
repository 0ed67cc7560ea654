"""Three peers in one private network namespace: a Polykey agent S as the
seed, our node N joined through it, then a second Polykey agent P joining
through S.

P's join makes S forward P's signal to the nodes connected to it, ours
included, with ``nodesConnectionSignalFinal`` (fire-and-forget: S swallows
connection errors and ErrorRPCHandlerFailed, and crashes on anything else).
Run by test_agent.py as ``unshare -n python -m tests.interop.polykey.three_peers STATE_DIR``; prints
one JSON line with what happened: whether S survived, and who found whom.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

from polykey.agent import NodeSettings, PolykeyNode, SeedNode
from polykey.nodes import NodeNotFoundError
from tests.interop.polykey.agents import running_agent


async def main(state_dir: Path) -> dict[str, Any]:
    await trio.run_process(["ip", "link", "set", "lo", "up"])
    report: dict[str, Any] = {}
    async with running_agent(state_dir / "s") as s:
        settings = NodeSettings(
            state_dir=state_dir / "ours",
            host="127.0.0.1",
            port=0,
            seeds=(SeedNode.parse(s.seed),),
        )
        async with PolykeyNode(settings) as node:
            with trio.fail_after(30):
                joined = await node.wait_joined()
            report["ours_joined"] = joined is not None and joined.seeds_reached == 1
            async with running_agent(state_dir / "p", [s.seed]) as p:
                # S forwards P's signals while P joins; it died within a
                # second of that when our node answered with a JSON error.
                await trio.sleep(3)
                report["s_alive_after_p_joined"] = s.alive()
                ours = str(node.node_id)
                for name, agent in (("p", p), ("s", s)):
                    with trio.fail_after(30):
                        answer = await agent.command({"op": "find", "nodeId": ours})
                    report[f"{name}_found_ours"] = answer["address"]
                for name, agent in (("s", s), ("p", p)):
                    try:
                        with trio.fail_after(30):
                            contact = await node.find_node(agent.node_id)
                    except NodeNotFoundError:
                        report[f"ours_found_{name}"] = None
                    else:
                        report[f"ours_found_{name}"] = [
                            contact.addresses[0].host,
                            contact.addresses[0].port,
                        ]
                report["addresses"] = {
                    "ours": list(node.address),
                    "s": list(s.address),
                    "p": list(p.address),
                }
                report["our_rpc"] = {
                    "unknown_methods": node.rpc_server.statistics().unknown_methods,
                }
                report["s_alive_at_end"] = s.alive()
            report["p_exit"] = p.process.returncode
    report["s_exit"] = s.process.returncode
    return report


if __name__ == "__main__":
    print(json.dumps(trio.run(main, Path(sys.argv[1]))), flush=True)
