"""What an idle incoming connection costs a node, in its process's RSS.

    .venv/bin/python bench/node_idle.py [--conns 600]

Starts ``python -m polykey node`` (its per-address admission limits raised:
every client here is on 127.0.0.1), connects one client node to it and lets
it settle, reads the node's RSS, connects ``--conns`` - 1 more client nodes
(each a ``NodeConnectionManager`` with its own identity and socket, in this
process), lets them settle, and reads the RSS again. Prints the difference
per connection in KiB. bench/quic.py's idle row is the same measurement for
a bare QUIC server; docs/quic.md has the figures of both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import trio

from polykey.keys import NodeId, NodeIdentity
from polykey.nodes import NodeConnectionManager
from polykey.quic import QUICSocket
from polykey.rpc import RPCServer

_UNLIMITED = "1000000"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _start_node(
    state_dir: str,
) -> tuple[subprocess.Popen[str], NodeId, tuple[str, int]]:
    limits = [
        "--max-connections", _UNLIMITED,
        "--max-connections-per-address", _UNLIMITED,
        "--max-handshakes-per-address", _UNLIMITED,
        "--handshake-rate", _UNLIMITED,
        "--handshake-burst", _UNLIMITED,
    ]  # fmt: skip
    node = subprocess.Popen(
        [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1",
         "--port", "0", "--state-dir", state_dir, *limits],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert node.stdout is not None
    lines: dict[str, str] = {}
    while "Seed" not in lines:
        line = node.stdout.readline()
        if not line:
            raise RuntimeError("the node exited before printing its seed")
        if ": " in line:
            key, value = line.strip().split(": ", 1)
            lines[key] = value
    host, port = lines["Address"].split()[0].rsplit(":", 1)
    return node, NodeId.from_string(lines["NodeId"]), (host, int(port))


async def _measure(conns: int, settle: float) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        node, node_id, address = _start_node(state_dir)
        try:
            identities = [NodeIdentity.generate() for _ in range(conns)]
            async with RPCServer({}) as rpc, trio.open_nursery() as nursery:

                async def client(
                    identity: NodeIdentity,
                    *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    async with (
                        QUICSocket("127.0.0.1") as socket,
                        trio.open_nursery() as inner,
                    ):
                        manager = NodeConnectionManager(socket, identity, rpc)
                        await inner.start(manager.run)
                        await manager.connect(node_id, address)
                        task_status.started()
                        await trio.sleep_forever()

                await nursery.start(client, identities[0])
                await trio.sleep(settle)
                before = _rss_kib(node.pid)
                for identity in identities[1:]:
                    await nursery.start(client, identity)
                await trio.sleep(settle)
                after = _rss_kib(node.pid)
                nursery.cancel_scope.cancel()
        finally:
            node.terminate()
            node.wait()
    n = conns - 1
    print(
        f"node RSS per idle incoming connection: {(after - before) / n:.2f} KiB "
        f"({before / 1024:.1f} -> {after / 1024:.1f} MiB, {n} connections)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=600, help="clients (600)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds (2)")
    args = parser.parse_args()
    if args.conns < 2:
        parser.error("--conns must be at least 2")
    trio.run(_measure, args.conns, args.settle)


if __name__ == "__main__":
    main()
