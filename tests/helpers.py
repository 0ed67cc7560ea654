"""Helpers for the tests that run ``python -m polykey`` as a user would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from polykey.keys import NodeId, NodeIdentity
from polykey.nodes import NodeConnectionManager
from polykey.quic import QUICSocket
from polykey.rpc import RPCServer


async def open_node(*args: str) -> tuple[trio.Process, dict[str, str]]:
    """``python -m polykey node ARGS``, once it printed its start-up lines
    (``NodeId``, ``Address``, ``Seed``...), as a dict."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "polykey", "node", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(20):
        while b"Seed:" not in buffer or not buffer.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            assert chunk, "the node exited before printing its seed"
            buffer += chunk
    lines = dict(
        line.split(": ", 1) for line in buffer.decode().splitlines() if ": " in line
    )
    return process, lines


async def start_node(
    state_dir: Path, *extra: str
) -> tuple[trio.Process, NodeId, tuple[str, int]]:
    process, lines = await open_node(
        "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir), *extra
    )
    node_id = NodeId.from_string(lines["NodeId"])
    host, port = lines["Address"].rsplit(":", 1)
    return process, node_id, (host, int(port))


async def dial(
    node_id: NodeId, address: tuple[str, int], *, local_host: str = "127.0.0.1"
) -> None:
    """Connect to the node with a pinned NodeId: both sides verify."""
    async with (
        QUICSocket(local_host) as socket,
        RPCServer({}) as rpc,
        trio.open_nursery() as nursery,
    ):
        manager = NodeConnectionManager(socket, NodeIdentity.generate(), rpc)
        await nursery.start(manager.run)
        with trio.fail_after(10):
            conn = await manager.connect(node_id, address)
        assert conn.connection.peer_identity == node_id
        nursery.cancel_scope.cancel()


async def stop(process: trio.Process, sig: int = signal.SIGTERM) -> int:
    process.send_signal(sig)
    with trio.fail_after(10):
        return await process.wait()


async def control_json(state_dir: Path, *args: str) -> tuple[int, Any]:
    """``python -m polykey ARGS --state-dir D --format json``: its exit
    status and its JSON (None when it printed none)."""
    result = await trio.run_process(
        [sys.executable, "-m", "polykey", *args, "--state-dir", str(state_dir),
         "--format", "json"],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    text = result.stdout.decode().strip()
    return result.returncode, json.loads(text) if text else None


BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, timeout: float = 90) -> str:
    """``python bench/SCRIPT ARGS`` to its end: its output, once it exited 0."""
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
