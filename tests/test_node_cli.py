"""``python -m polykey node`` as a user runs it: a real process on loopback."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from polykey._state import load_or_create_identity
from polykey.agent import NodeSettings, PolykeyNode, SeedNode
from polykey.keys import KeyFileError, NodeId, NodeIdentity, verify_chain
from polykey.nodes.connections import NodeConnectionManager
from polykey.quic import QUICSocket
from polykey.rpc import RPCServer


async def start_node(
    state_dir: Path, *extra: str
) -> tuple[trio.Process, NodeId, tuple[str, int]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(state_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(20):
        while b"Address:" not in buffer or not buffer.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            assert chunk, "the node exited before printing its address"
            buffer += chunk
    lines = dict(
        line.split(": ", 1) for line in buffer.decode().splitlines() if ": " in line
    )
    node_id = NodeId.from_string(lines["NodeId"])
    host, port = lines["Address"].rsplit(":", 1)
    return process, node_id, (host, int(port))


async def dial(node_id: NodeId, address: tuple[str, int]) -> None:
    """Connect to the node with a pinned NodeId: both sides verify."""
    async with (
        QUICSocket("127.0.0.1") as socket,
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


async def test_node_serves_and_stops_cleanly_then_keeps_its_identity(
    tmp_path: Path,
) -> None:
    process, node_id, address = await start_node(tmp_path)
    try:
        await dial(node_id, address)
        assert await stop(process, signal.SIGINT) == 0
    finally:
        if process.returncode is None:
            process.kill()
    assert (tmp_path / "keys" / "private_key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700

    process, again, address = await start_node(tmp_path)
    try:
        assert again == node_id
        await dial(node_id, address)
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()


async def test_sigkill_then_restart_keeps_node_id(tmp_path: Path) -> None:
    process, node_id, _ = await start_node(tmp_path)
    await stop(process, signal.SIGKILL)
    process, again, address = await start_node(tmp_path)
    try:
        assert again == node_id
        await dial(node_id, address)
    finally:
        await stop(process)


def test_bad_arguments_exit_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polykey", "node", "--state-dir", str(tmp_path),
         "--seed", "vnope@127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--seed" in result.stderr


def test_corrupt_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "private_key.pem").write_bytes(b"not a key")
    os.chmod(keys / "private_key.pem", 0o600)
    result = subprocess.run(
        [sys.executable, "-m", "polykey", "node", "--state-dir", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "private_key.pem" in result.stderr
    assert (keys / "private_key.pem").read_bytes() == b"not a key"
    with pytest.raises(KeyFileError):
        load_or_create_identity(tmp_path)


def test_expiring_certificate_is_renewed_with_the_same_key(tmp_path: Path) -> None:
    identity, created = load_or_create_identity(tmp_path)
    assert created
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    renewed, created = load_or_create_identity(tmp_path, now=later)
    assert not created
    assert renewed.node_id == identity.node_id
    assert verify_chain(renewed.cert_chain_der(), now=later) == identity.node_id


def test_seed_node_syntax() -> None:
    node_id = NodeIdentity.generate().node_id
    seed = SeedNode.parse(f"{node_id}@127.0.0.1:1314")
    assert (seed.node_id, seed.host, seed.port) == (node_id, "127.0.0.1", 1314)
    assert SeedNode.parse(f"{node_id}@[::1]:9").host == "::1"
    assert SeedNode.parse(str(seed)) == seed
    for bad in (
        f"{node_id}@[fe80::1%eth0]:1",
        f"{node_id}@host:0",
        f"{node_id}@::1:5",
        "x@h:1",
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own problem
            SeedNode.parse(bad)


async def test_node_in_process(tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    async with PolykeyNode(settings) as a:
        other = NodeSettings(state_dir=tmp_path / "b", host="127.0.0.1", port=0)
        async with PolykeyNode(other) as b:
            with trio.fail_after(10):
                conn = await b.connect(a.node_id, a.address)
            assert conn.node_id == a.node_id


async def run_node_until(
    settings: NodeSettings,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[PolykeyNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with PolykeyNode(settings) as node:
        task_status.started(node)
        await stop.wait()


async def test_five_nodes_find_each_other_through_one_seed(tmp_path: Path) -> None:
    """In one process, over real QUIC on loopback: four nodes join through a
    seed, each finds every other by NodeId, and still does once the seed is
    gone."""

    def settings(name: str, seeds: tuple[SeedNode, ...] = ()) -> NodeSettings:
        return NodeSettings(
            state_dir=tmp_path / name, host="127.0.0.1", port=0, seeds=seeds
        )

    stop_seed, stop_all = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        seed: PolykeyNode = await nursery.start(
            run_node_until, settings("seed"), stop_seed
        )
        seed_contact = SeedNode(seed.node_id, *seed.address)
        nodes: list[PolykeyNode] = []
        for i in range(4):
            node: PolykeyNode = await nursery.start(
                run_node_until, settings(f"n{i}", (seed_contact,)), stop_all
            )
            with trio.fail_after(30):
                joined = await node.wait_joined()
            assert joined is not None
            assert joined.seeds_reached == 1
            nodes.append(node)
        with trio.fail_after(60):
            for node in nodes:
                for other in nodes:
                    if other is not node:
                        found = await node.find_node(other.node_id)
                        assert found.node_id == other.node_id
                        assert found.addresses[0].port == other.address[1]
        # The seed stops; the others still find each other from their graphs.
        stop_seed.set()
        with trio.fail_after(60):
            for node in nodes:
                for other in nodes:
                    if other is not node:
                        assert (
                            await node.find_node(other.node_id)
                        ).node_id == other.node_id
        stop_all.set()


async def test_restart_after_sigkill_keeps_graph(tmp_path: Path) -> None:
    """A node killed with SIGKILL comes back with its NodeId and its graph."""
    seed_dir = tmp_path / "seed"
    seed, seed_id, (host, port) = await start_node(seed_dir)
    try:
        node_dir = tmp_path / "node"
        proc, node_id, _ = await start_node(
            node_dir, "--seed", f"{seed_id}@{host}:{port}"
        )
        status = b""
        with trio.fail_after(30):
            while b"Graph: 1 nodes" not in status:
                result = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "polykey",
                        "status",
                        "--state-dir",
                        str(node_dir),
                    ],
                    capture_stdout=True,
                    check=False,
                )
                status = result.stdout
        await stop(proc, signal.SIGKILL)
        # No seed given this time: the graph on disk is all it has.
        proc, again, _ = await start_node(node_dir)
        try:
            assert again == node_id
            with trio.fail_after(30):
                result = await trio.run_process(
                    [sys.executable, "-m", "polykey", "find", str(seed_id),
                     "--state-dir", str(node_dir)],
                    capture_stdout=True,
                )  # fmt: skip
            assert result.stdout.decode().split()[1] == f"{host}:{port}"
        finally:
            await stop(proc)
    finally:
        await stop(seed)
