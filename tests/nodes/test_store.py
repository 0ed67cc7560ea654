"""The node graph's SQLite file: restarts, crashes, and files that are not ours."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polykey.keys import NodeId
from polykey.nodes import (
    NodeGraph,
    NodeGraphCorruptError,
    NodeGraphForeignError,
    NodeGraphStoreError,
    NodeGraphVersionError,
)

from .helpers import addr, id_in_bucket

OWN = NodeId.from_int(0xABCDEF << 200)


def snapshot(graph: NodeGraph) -> dict[int, list[tuple[NodeId, tuple[object, ...]]]]:
    return {
        i: [(c.node_id, c.addresses) for c in graph.bucket(i)]
        for i in graph.nonempty_buckets()
    }


def test_restart_keeps_the_graph(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    rng = random.Random(1)
    with NodeGraph.open(path, OWN, k=4) as graph:
        ids = [id_in_bucket(OWN, i % 6 + 250, rng) for i in range(30)]
        for n, nid in enumerate(ids):
            graph.add(nid, [addr(n), addr(n + 100)], float(n))
        graph.touch(ids[0], 99.0)  # lazily persisted, flushed on close
        graph.remove(ids[1])
        before = snapshot(graph)
        assert graph.persistent
    with NodeGraph.open(path, OWN, k=4) as again:
        assert snapshot(again) == before
        assert again.last_seen(ids[0]) == 99.0
        assert ids[1] not in again
        # order continues after a restart
        again.add(ids[2], addr(2), 100.0)
        bucket = again.bucket(again.bucket_index(ids[2]))
        assert bucket[-1].node_id == ids[2]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_killed_process_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal
        from polykey.keys import NodeId
        from polykey.nodes import NodeGraph, NodeAddress
        own = NodeId.from_int({OWN.to_int()})
        graph = NodeGraph.open({str(path)!r}, own)
        for i in range(1, 51):
            graph.add(NodeId.from_int(own.to_int() ^ (i << 100)), NodeAddress("10.0.0.1", i), 0.0)
        graph.remove(NodeId.from_int(own.to_int() ^ (7 << 100)))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "committed" in proc.stdout
    with NodeGraph.open(path, OWN) as graph:
        assert len(graph) == 49
        assert NodeId.from_int(OWN.to_int() ^ (7 << 100)) not in graph
        contact = graph.get(NodeId.from_int(OWN.to_int() ^ (50 << 100)))
        assert contact is not None
        assert contact.addresses[0].port == 50


def test_corrupt_file_is_a_clear_error_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    data = os.urandom(8192)
    path.write_bytes(data)
    with pytest.raises(NodeGraphCorruptError, match="not a readable database"):
        NodeGraph.open(path, OWN)
    assert path.read_bytes() == data


def test_damaged_pages_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    with NodeGraph.open(path, OWN) as graph:
        for i in range(1, 300):
            graph.add(NodeId.from_int(OWN.to_int() ^ (i << 60)), addr(i), 0.0)
    # Checkpoint the WAL into the main file, then damage a page past the header.
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    raw = bytearray(path.read_bytes())
    assert len(raw) > 8192
    raw[4096 + 8 : 4096 + 400] = os.urandom(392)
    path.write_bytes(bytes(raw))
    with pytest.raises(NodeGraphCorruptError):
        NodeGraph.open(path, OWN)


def test_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE recipes (name TEXT)")
    db.execute("INSERT INTO recipes VALUES ('soup')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(NodeGraphForeignError, match="another program"):
        NodeGraph.open(path, OWN)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("SELECT name FROM recipes").fetchall() == [
        ("soup",)
    ]


def test_another_nodes_graph_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    NodeGraph.open(path, OWN).close()
    with pytest.raises(NodeGraphForeignError, match="the graph of node"):
        NodeGraph.open(path, NodeId.from_int(1))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    NodeGraph.open(path, OWN).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(NodeGraphVersionError, match="newer"):
        NodeGraph.open(path, OWN)


def test_invalid_rows_are_corruption_not_silence(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    with NodeGraph.open(path, OWN) as graph:
        graph.add(NodeId.from_int(OWN.to_int() ^ 5), addr(1), 0.0)
    db = sqlite3.connect(path)
    db.execute("UPDATE nodes SET addresses = '[[\"fe80::1%eth0\", 1]]'")
    db.commit()
    db.close()
    with pytest.raises(NodeGraphCorruptError, match="invalid node row"):
        NodeGraph.open(path, OWN)


def test_missing_tables_are_corruption(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite"
    NodeGraph.open(path, OWN).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE nodes")
    db.commit()
    db.close()
    with pytest.raises(NodeGraphCorruptError, match="missing"):
        NodeGraph.open(path, OWN)


def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(NodeGraphStoreError):
        NodeGraph.open(tmp_path / "no" / "such" / "dir" / "graph.sqlite", OWN)
