"""The node graph's SQLite file: WAL, one transaction per mutation.

Layout: ``PRAGMA application_id`` marks the file as ours, ``PRAGMA
user_version`` is the schema version, and the ``meta`` table names the
schema and the NodeId the graph belongs to. Opening never changes a file it
does not recognise: a corrupt file, another program's SQLite database, a
newer schema, or another node's graph each raise their own
:class:`~polykey.nodes.NodeGraphStoreError` subclass.

WAL mode with ``synchronous=FULL`` (the default) makes every commit durable
when the call returns, across a process kill and a power cut; ``NORMAL``
keeps process-kill durability and may lose the last commits on power loss.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Final, Literal

from ..keys import NODE_ID_LENGTH, NodeId
from ._address import NodeAddress
from ._errors import (
    InvalidAddressError,
    NodeGraphCorruptError,
    NodeGraphForeignError,
    NodeGraphStoreError,
    NodeGraphVersionError,
)
from ._graph import StoredNode

__all__ = ["APPLICATION_ID", "SCHEMA_NAME", "SCHEMA_VERSION", "SQLiteGraphStore"]

#: "PKNG" in the SQLite header's application_id field.
APPLICATION_ID: Final = 0x504B4E47
SCHEMA_NAME: Final = "polykey.nodes.graph"
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE nodes (
    node_id BLOB PRIMARY KEY CHECK (length(node_id) = 32),
    addresses TEXT NOT NULL,
    last_seen REAL NOT NULL,
    seq INTEGER NOT NULL
);
"""


class SQLiteGraphStore:
    """One open graph file; used by :meth:`NodeGraph.open`."""

    def __init__(
        self,
        path: Path,
        own_id: NodeId,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        previous_ids: frozenset[NodeId] = frozenset(),
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = path
        self.own_id = own_id
        self._previous_ids = previous_ids
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. Writes
            # may come from the graph writer's worker thread (one at a time).
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise NodeGraphStoreError(path, f"cannot open: {exc}") from exc
        try:
            self._open(synchronous)
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "unable to open" in str(exc):
                raise NodeGraphStoreError(path, f"cannot open: {exc}") from exc
            raise NodeGraphCorruptError(
                path, f"not a readable database: {exc}"
            ) from exc
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise NodeGraphCorruptError(
                path, f"not a readable database: {exc}"
            ) from exc
        except BaseException:
            self._db.close()
            raise

    def _open(self, synchronous: str) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            row[0]
            for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if app_id == 0 and version == 0 and not tables:
            self._create()
        elif app_id != APPLICATION_ID:
            raise NodeGraphForeignError(
                self.path, "a SQLite database of another program (refusing to touch it)"
            )
        elif version > SCHEMA_VERSION:
            raise NodeGraphVersionError(
                self.path,
                f"schema version {version} is newer than this polykey's "
                f"{SCHEMA_VERSION}; upgrade polykey",
            )
        elif version < 1 or not {"meta", "nodes"} <= tables:
            raise NodeGraphCorruptError(self.path, "node graph tables are missing")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise NodeGraphCorruptError(self.path, f"integrity check failed: {check}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != SCHEMA_NAME:
            raise NodeGraphForeignError(self.path, "not a polykey node graph")
        owner = meta.get("node_id")
        if owner != self.own_id.encode() and owner in {
            n.encode() for n in self._previous_ids
        }:
            # Ours under a NodeId we had before a key renewal: same nodes,
            # seen from the new NodeId now.
            self.set_owner(self.own_id)
            meta["node_id"] = self.own_id.encode()
        if meta.get("node_id") != self.own_id.encode():
            raise NodeGraphForeignError(
                self.path, f"the graph of node {meta.get('node_id')}, not {self.own_id}"
            )
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise NodeGraphStoreError(self.path, f"cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous}")

    def _create(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema", SCHEMA_NAME), ("node_id", self.own_id.encode())],
            )
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def load(self) -> list[StoredNode]:
        out: list[StoredNode] = []
        try:
            rows = self._db.execute(
                "SELECT node_id, addresses, last_seen, seq FROM nodes"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise NodeGraphCorruptError(self.path, f"cannot read nodes: {exc}") from exc
        for raw, addresses, last_seen, seq in rows:
            try:
                if not isinstance(raw, bytes) or len(raw) != NODE_ID_LENGTH:
                    raise ValueError("bad node_id")
                parsed = json.loads(addresses)
                if not isinstance(parsed, list) or not parsed:
                    raise ValueError("bad address list")
                addrs = tuple(NodeAddress(host, port) for host, port in parsed)
                out.append((NodeId(raw), addrs, float(last_seen), int(seq)))
            except (ValueError, TypeError, InvalidAddressError) as exc:
                raise NodeGraphCorruptError(
                    self.path,
                    f"invalid node row ({exc}); the file was edited or damaged",
                ) from exc
        return out

    def write(self, upserts: list[StoredNode], deletes: list[NodeId]) -> None:
        """Apply ``upserts`` and ``deletes`` in one committed transaction."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if upserts:
                    db.executemany(
                        "INSERT OR REPLACE INTO nodes (node_id, addresses, last_seen, seq)"
                        " VALUES (?, ?, ?, ?)",
                        [
                            (
                                node_id.raw,
                                json.dumps([[a.host, a.port] for a in addresses]),
                                last_seen,
                                seq,
                            )
                            for node_id, addresses, last_seen, seq in upserts
                        ],
                    )
                if deletes:
                    db.executemany(
                        "DELETE FROM nodes WHERE node_id = ?",
                        [(node_id.raw,) for node_id in deletes],
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise NodeGraphStoreError(self.path, f"write failed: {exc}") from exc

    def set_owner(self, node_id: NodeId) -> None:
        """Make the file the graph of ``node_id`` (after a key renewal: the
        nodes are the same, seen from the node's new NodeId)."""
        try:
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'node_id'", (node_id.encode(),)
            )
            self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id.raw,))
        except sqlite3.Error as exc:
            raise NodeGraphStoreError(self.path, f"write failed: {exc}") from exc
        self.own_id = node_id

    def close(self) -> None:
        self._db.close()
