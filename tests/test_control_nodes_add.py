"""``nodesAdd`` on the control socket (``polykey nodes add``) adds as the
node manager does: its reply means the row is committed to the graph's
file (a SIGKILL right after loses nothing), and a full bucket is not
overfilled."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey._control import control_client
from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import NodeId
from polykey.nodes import NodeGraph


def rows_on_disk(state_dir: Path) -> set[bytes]:
    """NodeIds in the graph's file, read by a separate SQLite connection."""
    db = sqlite3.connect(f"file:{state_dir / 'nodes.sqlite3'}?mode=ro", uri=True)
    try:
        return {bytes(r[0]) for r in db.execute("SELECT node_id FROM nodes")}
    finally:
        db.close()


async def add(state_dir: Path, node_id: NodeId, port: int) -> Any:
    with trio.fail_after(20):
        return await control_client(state_dir).unary(
            "nodesAdd",
            {"nodeIdEncoded": str(node_id), "host": "127.0.0.1", "port": port,
             "ping": False},
        )  # fmt: skip


async def test_reply_comes_after_the_row_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk: every graph write takes 0.5 s in the writer's thread.
    original = NodeGraph.write

    def slow_write(self: NodeGraph, rows: Any, deletes: Any) -> None:
        time.sleep(0.5)
        original(self, rows, deletes)

    monkeypatch.setattr(NodeGraph, "write", slow_write)
    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    rng = random.Random(7)
    with trio.fail_after(40):
        async with PolykeyNode(settings):
            for i in range(3):
                target = NodeId(rng.randbytes(32))
                reply = await add(tmp_path, target, 4000 + i)
                assert reply["added"] is True
                assert target.raw in rows_on_disk(tmp_path)


async def test_a_full_bucket_of_fresh_nodes_keeps_the_newcomer_out(
    tmp_path: Path,
) -> None:
    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    rng = random.Random(8)
    with trio.fail_after(60):
        async with PolykeyNode(settings) as node:
            own = node.node_id.to_int()

            def far() -> NodeId:  # in bucket 255, the farthest half
                return NodeId.from_int(own ^ ((1 << 255) | rng.getrandbits(255)))

            members = [far() for _ in range(node.graph.k)]
            for i, member in enumerate(members):
                assert (await add(tmp_path, member, 5000 + i))["added"] is True
            newcomer = far()
            reply = await add(tmp_path, newcomer, 6000)
            # Every member was just added (fresh, so not pinged): no room.
            assert reply["added"] is False
            assert newcomer not in node.graph
            assert len(node.graph.bucket(255)) == node.graph.k
            assert all(m in node.graph for m in members)
