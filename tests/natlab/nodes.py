"""Real ``python -m polykey node`` processes in a NAT lab.

:func:`lab_node` starts a node in one of the lab's hosts (its state in a
directory of ours, its control socket reachable from anywhere, as Unix
sockets are not namespaced) and stops it on the way out. :func:`control`
runs a control command (``status``, ``ping``...) with ``--format json`` and
returns its JSON. Used by tests/natlab/test_nat_nodes.py and bench/nat.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .lab import SEED_ADDRESS, Host, NatLab

__all__ = ["SEED_PORT", "LabNode", "control", "lab_node", "wait_joined"]

#: The port every lab node listens on (each host has its own stack).
SEED_PORT = 1314


@dataclass
class LabNode:
    host: Host
    state_dir: Path
    node_id: str
    process: trio.Process

    @property
    def seed(self) -> str:
        """This node as a ``--seed`` value, when it is the lab's seed."""
        return f"{self.node_id}@{SEED_ADDRESS}:{SEED_PORT}"


@asynccontextmanager
async def lab_node(
    lab: NatLab,
    host: Host,
    state_dir: Path,
    *,
    seeds: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> AsyncIterator[LabNode]:
    argv = [sys.executable, "-m", "polykey", "node", "--port", str(SEED_PORT),
            "--state-dir", str(state_dir), "--log-level", "debug", *extra]  # fmt: skip
    for seed in seeds:
        argv += ["--seed", seed]
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - local, quick
    log = open(state_dir.with_suffix(".log"), "wb")  # noqa: ASYNC230, SIM115 - closed below
    process = await trio.lowlevel.open_process(
        lab.exec_argv(host, argv), stdout=subprocess.PIPE, stderr=log
    )
    try:
        assert process.stdout is not None
        out = b""
        with trio.fail_after(30):
            while b"Seed:" not in out or not out.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(
                        f"node in {host.label} exited: "
                        + state_dir.with_suffix(".log").read_text(errors="replace")[
                            -2000:
                        ]
                    )
                out += chunk
        lines = dict(
            line.split(": ", 1) for line in out.decode().splitlines() if ": " in line
        )
        yield LabNode(host, state_dir, lines["NodeId"], process)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            log.close()


async def control(node: LabNode, *args: str) -> dict[str, Any]:
    """``python -m polykey ARGS --state-dir ... --format json`` -> its JSON
    (the CLI itself gives up after 90 s; bound it with a cancel scope)."""
    argv = [sys.executable, "-m", "polykey", *args, "--state-dir", str(node.state_dir),
            "--format", "json"]  # fmt: skip
    result = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False
    )
    if not result.stdout.strip():
        raise RuntimeError(
            f"polykey {args[0]}: {result.stderr.decode(errors='replace')}"
        )
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


async def wait_joined(node: LabNode, seed_id: str) -> dict[str, Any]:
    """Wait until ``node`` holds a connection to the seed and knows it."""
    while True:
        status = await control(node, "status")
        ids = {c["nodeIdEncoded"] for c in status["connections"]}
        if seed_id in ids and status["graphSize"] >= 1:
            return status
        await trio.sleep(0.1)
