"""Five nodes as separate ``python -m polykey node`` processes on loopback,
joining through one seed; each finds every other by NodeId (asked through
``python -m polykey find``), also after the seed is stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from polykey.keys import NodeId

from .helpers import control_json, start_node, stop


async def find(state_dir: Path, node_id: NodeId) -> tuple[str, int] | None:
    rc, found = await control_json(state_dir, "nodes", "find", str(node_id))
    if rc != 0:
        return None
    host, port = found["addresses"][0]
    return host, int(port)


async def test_five_processes_find_each_other(tmp_path: Path) -> None:
    processes: list[trio.Process] = []
    try:
        seed_dir = tmp_path / "seed"
        seed, seed_id, (host, port) = await start_node(seed_dir)
        processes.append(seed)
        nodes = []
        for i in range(4):
            state = tmp_path / f"node{i}"
            proc, node_id, address = await start_node(
                state, "--seed", f"{seed_id}@{host}:{port}"
            )
            processes.append(proc)
            nodes.append((state, node_id, address))

        async def everyone_finds_everyone() -> None:
            for state, node_id, _ in nodes:
                for _, other_id, other_address in nodes:
                    if other_id != node_id:
                        assert await find(state, other_id) == other_address, (
                            f"{node_id} did not find {other_id}"
                        )

        with trio.fail_after(120):
            await everyone_finds_everyone()
            assert await stop(seed, signal.SIGTERM) == 0
            await everyone_finds_everyone()
        # The status command talks to a live node too.
        with trio.fail_after(60):
            rc, status = await control_json(nodes[0][0], "agent", "status")
        assert rc == 0
        assert status["nodeIdEncoded"] == str(nodes[0][1])
        assert status["connections"]
    finally:
        for proc in processes:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
