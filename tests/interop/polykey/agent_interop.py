"""Our node against Polykey's own agent, both in one private network namespace.

Run by test_agent.py as ``unshare -n python -m tests.interop.polykey.agent_interop STATE_DIR``:
brings up the namespace's loopback, starts a Polykey 1.15 agent with our node
as its seed (so the agent dials us), dials the agent ourselves with its
NodeId pinned, calls its nodesClosestLocalNodesGet, and prints one JSON line
with what happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

from polykey.agent import NodeSettings, PolykeyNode
from tests.interop.polykey.agents import running_agent


async def main(state_dir: Path) -> dict[str, Any]:
    await trio.run_process(["ip", "link", "set", "lo", "up"])
    report: dict[str, Any] = {}
    settings = NodeSettings(state_dir=state_dir / "ours", host="127.0.0.1", port=0)
    async with PolykeyNode(settings) as node:
        host, port = node.address
        report["ours"] = str(node.node_id)
        async with running_agent(
            state_dir / "agent", [f"{node.node_id}@{host}:{port}"]
        ) as agent:
            report["agent"] = agent.info
            # The agent was given us as a seed: it dials us.
            with trio.move_on_after(30):
                while node.connections.get(agent.node_id) is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            inbound = node.connections.get(agent.node_id)
            report["agent_dialled_us"] = inbound is not None and not inbound.outgoing
            with trio.fail_after(30):
                conn = await node.connect(agent.node_id, agent.address)
            report["we_dialled_agent"] = conn.connection.peer_identity == agent.node_id
            report["agent_chain_length"] = len(conn.connection.peer_certificates)
            with trio.fail_after(30):
                async with conn.rpc.server_stream(
                    "nodesClosestLocalNodesGet", {"nodeIdEncoded": str(node.node_id)}
                ) as results:
                    report["closest"] = [r async for r in results]
        report["agent_exit"] = agent.process.returncode
    return report


if __name__ == "__main__":
    print(json.dumps(trio.run(main, Path(sys.argv[1]))), flush=True)
