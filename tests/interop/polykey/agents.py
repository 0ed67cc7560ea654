"""Polykey 1.15 agents (npm) as peers, for the scripts that run inside a
private network namespace (agent_interop.py, three_peers.py).

:func:`running_agent` starts ``agent.mjs`` and yields an :class:`Agent`
once it printed its NodeId and address; :meth:`Agent.command` sends one
JSON command and returns the agent's one-line answer. Leaving the block
closes the agent's stdin (it stops cleanly) and waits for it, as
:meth:`Agent.stop` does sooner.

``options`` are agent.mjs's ``--name=value`` options (``--host=::``...);
``argv_prefix`` runs it under another command (the NAT lab's ``ip netns
exec NS``); ``stderr`` is where its log goes (default: ours).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

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

    async def stop(self, grace: float = 20.0) -> int:
        """Close its stdin (it stops cleanly and exits), wait up to
        ``grace`` seconds, then kill it; returns its exit status. Shielded,
        and idempotent: leaving running_agent's block does it too."""
        process = self.process
        assert process.stdin is not None
        with trio.CancelScope(shield=True):
            try:
                await process.stdin.aclose()
            except trio.BrokenResourceError:
                pass
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode


@asynccontextmanager
async def running_agent(
    node_path: Path,
    seeds: Sequence[str] = (),
    *,
    options: Sequence[str] = (),
    argv_prefix: Sequence[str] = (),
    stderr: IO[bytes] | None = None,
) -> AsyncIterator[Agent]:
    argv = ["node", str(HERE / "agent.mjs"), *options, str(node_path), *seeds]
    process = await trio.lowlevel.open_process(
        [*argv_prefix, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    agent = Agent(process, {})
    try:
        with trio.fail_after(60):
            agent.info = await agent.read_line()
        yield agent
    finally:
        await agent.stop()
