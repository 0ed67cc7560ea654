"""Our node against Polykey's own agent, both in one private network namespace.

Run by test_agent.py as ``unshare -n python agent_interop.py STATE_DIR``:
brings up the namespace's loopback, starts a Polykey 1.15 agent with our node
as its seed (so the agent dials us), dials the agent ourselves with its
NodeId pinned, calls its nodesClosestLocalNodesGet, and prints one JSON line
with what happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import NodeId

HERE = Path(__file__).resolve().parent


async def main(state_dir: Path) -> dict[str, Any]:
    await trio.run_process(["ip", "link", "set", "lo", "up"])
    report: dict[str, Any] = {}
    settings = NodeSettings(state_dir=state_dir / "ours", host="127.0.0.1", port=0)
    async with PolykeyNode(settings) as node:
        host, port = node.address
        report["ours"] = str(node.node_id)
        agent = await trio.lowlevel.open_process(
            ["node", str(HERE / "agent.mjs"), str(state_dir / "agent"),
             f"{node.node_id}@{host}:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert agent.stdout is not None
        assert agent.stdin is not None
        try:
            line = b""
            with trio.fail_after(60):
                while not line.endswith(b"\n"):
                    chunk = await agent.stdout.receive_some()
                    if not chunk:
                        raise RuntimeError("the agent exited before it started")
                    line += chunk
            info = json.loads(line)
            agent_id = NodeId.from_string(info["nodeId"])
            report["agent"] = info
            # The agent was given us as a seed: it dials us.
            with trio.move_on_after(30):
                while node.connections.get(agent_id) is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            inbound = node.connections.get(agent_id)
            report["agent_dialled_us"] = inbound is not None and not inbound.outgoing
            with trio.fail_after(30):
                conn = await node.connect(agent_id, (info["host"], info["port"]))
            report["we_dialled_agent"] = conn.connection.peer_identity == agent_id
            report["agent_chain_length"] = len(conn.connection.peer_certificates)
            with trio.fail_after(30):
                async with conn.rpc.server_stream(
                    "nodesClosestLocalNodesGet", {"nodeIdEncoded": str(node.node_id)}
                ) as results:
                    report["closest"] = [r async for r in results]
        finally:
            await agent.stdin.aclose()
            with trio.move_on_after(20):
                await agent.wait()
            if agent.returncode is None:
                agent.kill()
            report["agent_exit"] = agent.returncode
    return report


if __name__ == "__main__":
    print(json.dumps(trio.run(main, Path(sys.argv[1]))), flush=True)
