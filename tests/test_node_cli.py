"""``python -m polykey node`` as a user runs it: a real process on loopback."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from polykey._state import load_or_create_identity
from polykey.agent import NodeSettings, PolykeyNode, SeedNode
from polykey.keys import KeyFileError, NodeIdentity, verify_chain

from .helpers import control_json, dial, open_node, start_node, stop


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
    assert result.returncode == 64  # EX_USAGE
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
        with trio.fail_after(30):
            while True:
                _, status = await control_json(node_dir, "agent", "status")
                if status["nodesTotal"] >= 1:
                    break
                await trio.sleep(0.1)
        await stop(proc, signal.SIGKILL)
        # No seed given this time: the graph on disk is all it has.
        proc, again, _ = await start_node(node_dir)
        try:
            assert again == node_id
            with trio.fail_after(30):
                rc, found = await control_json(node_dir, "nodes", "find", str(seed_id))
            assert rc == 0
            assert found["addresses"] == [[host, port]]
        finally:
            await stop(proc)
    finally:
        await stop(seed)


def test_seed_refuses_what_cannot_be_dialled() -> None:
    node_id = NodeIdentity.generate().node_id
    for bad, why in (
        (f"{node_id}@[::]:1314", "unicast"),
        (f"{node_id}@0.0.0.0:1314", "unicast"),
        (f"{node_id}@224.0.0.1:1314", "unicast"),
        (f"{node_id}@bad_host!:1314", "hostname"),
        (f"{node_id}@host:x", "not a number"),
    ):
        with pytest.raises(ValueError, match=why):
            SeedNode.parse(bad)
    # A hostname is kept (resolved when dialled), in lower case.
    assert SeedNode.parse(f"{node_id}@LocalHost:9").host == "localhost"


def test_a_wildcard_seed_is_refused_at_parse_time(tmp_path: Path) -> None:
    node_id = NodeIdentity.generate().node_id
    result = subprocess.run(
        [sys.executable, "-m", "polykey", "node", "--state-dir", str(tmp_path),
         "--seed", f"{node_id}@[::]:1314"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 64  # EX_USAGE
    assert "'::' is not a unicast address" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_printed_seed_line_is_dialable(tmp_path: Path) -> None:
    """Bound to the wildcard, the node prints a seed a peer can use as is."""
    process, lines = await open_node("--port", "0", "--state-dir", str(tmp_path))
    try:
        assert lines["Address"].endswith("(all interfaces)")
        seed = SeedNode.parse(lines["Seed"])  # as a user would pass it
        assert seed.host not in ("::", "0.0.0.0")
        await dial(seed.node_id, (seed.host, seed.port), local_host="::")
    finally:
        await stop(process)


async def test_hostname_seeds_are_resolved(tmp_path: Path) -> None:
    async with PolykeyNode(
        NodeSettings(state_dir=tmp_path / "seed", host="127.0.0.1", port=0)
    ) as seed:
        by_name = SeedNode.parse(f"{seed.node_id}@localhost:{seed.address[1]}")
        settings = NodeSettings(
            state_dir=tmp_path / "a", host="127.0.0.1", port=0, seeds=(by_name,)
        )
        async with PolykeyNode(settings) as node:
            with trio.fail_after(30):
                joined = await node.wait_joined()
            assert joined is not None
            assert joined.seeds_reached == 1
            assert node.connections.get(seed.node_id) is not None


async def test_a_seed_not_reached_is_reported_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node_id = NodeIdentity.generate().node_id
    settings = NodeSettings(
        state_dir=tmp_path,
        host="127.0.0.1",
        port=0,
        seeds=(SeedNode.parse(f"{node_id}@no-such-host.invalid:1314"),),
    )
    caplog.set_level(logging.INFO, logger="polykey")
    async with PolykeyNode(settings) as node:
        with trio.fail_after(30):
            joined = await node.wait_joined()
    assert joined is not None
    assert joined.seeds_reached == 0
    (message,) = [
        r.getMessage() for r in caplog.records if "not reached" in r.getMessage()
    ]
    assert "no-such-host.invalid:1314" in message
    assert "cannot resolve 'no-such-host.invalid'" in message


async def test_a_second_node_on_a_state_dir_in_use_fails_at_once(
    tmp_path: Path,
) -> None:
    process, node_id, address = await start_node(tmp_path)
    try:
        with trio.fail_after(15):
            second = await trio.run_process(
                [sys.executable, "-m", "polykey", "node", "--port", "0",
                 "--state-dir", str(tmp_path)],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert second.returncode == 1
        err = second.stderr.decode()
        assert f"state directory {tmp_path} is in use by another node" in err
        assert "Traceback" not in err
        await dial(node_id, address)  # the first one never noticed
    finally:
        await stop(process)


async def test_simultaneous_first_starts_on_one_dir_one_wins(tmp_path: Path) -> None:
    results: list[int] = []

    async def start() -> None:
        result = await trio.run_process(
            [sys.executable, "-m", "polykey", "node", "--port", "0",
             "--state-dir", str(tmp_path)],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        results.append(result.returncode)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            nursery.start_soon(start)
            # The loser exits at once; then stop the winner.
            while not results:  # noqa: ASYNC110
                await trio.sleep(0.05)
            holder = (tmp_path / "lock").read_text().strip()
            os.kill(int(holder), signal.SIGTERM)
    assert sorted(results) == [0, 1]
    _identity, created = load_or_create_identity(tmp_path)
    assert not created


async def test_start_up_failing_after_the_tasks_started_does_not_hang(
    tmp_path: Path,
) -> None:
    """A failure in the last start-up step (here: a live socket, not ours,
    where the control socket goes) ends start-up with the error instead of
    waiting for the tasks already started."""
    (tmp_path / "keys").mkdir(parents=True)
    squatter = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await squatter.bind(str(tmp_path / "control.sock"))
    squatter.listen(1)
    try:
        settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
        with trio.fail_after(10), pytest.raises(OSError, match="already running"):
            async with PolykeyNode(settings):
                pass  # pragma: no cover
    finally:
        squatter.close()
    # Nothing was left locked: a node starts there now.
    (tmp_path / "control.sock").unlink()
    async with PolykeyNode(settings) as node:
        assert node.connections.socket.local_address[1] != 0


def test_a_state_dir_too_long_for_the_control_socket_says_so(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "polykey", "node", "--port", "0",
         "--state-dir", str(long_dir)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "too long a path for the control socket" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_busy_port_is_named(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert (
        f"cannot listen on UDP 127.0.0.1:{port}: Address already in use"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


async def test_events_say_who_connected_and_left_without_polling(
    tmp_path: Path,
) -> None:
    from polykey.agent import NodeEvent

    with trio.fail_after(30):
        async with PolykeyNode(
            NodeSettings(state_dir=tmp_path / "a", host="127.0.0.1", port=0)
        ) as a:
            with a.events() as events:
                client_dir = tmp_path / "b"
                async with PolykeyNode(
                    NodeSettings(state_dir=client_dir, host="127.0.0.1", port=0)
                ) as b:
                    await b.connect(a.node_id, a.address)
                    event = await events.receive()
                    assert event == NodeEvent("connected", b.node_id, "direct", False)
                # b stopped: its connection ended.
                event = await events.receive()
                assert event == NodeEvent("disconnected", b.node_id)
