"""Polykey 1.15 agents (npm) as peers, for the scripts that run inside a
private network namespace (agent_interop.py, three_peers.py).

:func:`running_agent` starts ``agent.mjs`` and yields an :class:`Agent`
once it printed its NodeId and address; :meth:`Agent.command` sends one
JSON command and returns the agent's one-line answer. Leaving the block
closes the agent's stdin (it stops cleanly) and waits for it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from polykey.keys import NodeId

HERE = Path(__file__).resolve().parent


@attrs.define
class Agent:
    process: trio.Process
    info: dict[str, Any]
    _buffer: bytes = b""

    @property
    def node_id(self) -> NodeId:
        return NodeId.from_string(self.info["nodeId"])

    @property
    def address(self) -> tuple[str, int]:
        return self.info["host"], int(self.info["port"])

    @property
    def seed(self) -> str:
        host, port = self.address
        return f"{self.info['nodeId']}@{host}:{port}"

    async def read_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"the agent exited ({self.process.poll()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        return await self.read_line()

    def alive(self) -> bool:
        return self.process.poll() is None


@asynccontextmanager
async def running_agent(
    node_path: Path, seeds: Sequence[str] = ()
) -> AsyncIterator[Agent]:
    process = await trio.lowlevel.open_process(
        ["node", str(HERE / "agent.mjs"), str(node_path), *seeds],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None
    try:
        agent = Agent(process, {})
        with trio.fail_after(60):
            agent.info = await agent.read_line()
        yield agent
    finally:
        with trio.CancelScope(shield=True):
            try:
                await process.stdin.aclose()
            except trio.BrokenResourceError:
                pass
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
