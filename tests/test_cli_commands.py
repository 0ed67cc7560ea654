"""Every control command against real ``python -m polykey node`` processes,
in both formats, asserting on the JSON (not on text), and each failure's
exit status (sysexits) and one-line message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from polykey.keys import KeyPair

from .helpers import control_json, start_node, stop

EX_DATAERR, EX_UNAVAILABLE, EX_USAGE = 65, 69, 64


async def human(state_dir: Path, *args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "polykey", *args, "--state-dir", str(state_dir)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def first_json_line(process: trio.Process) -> Any:
    """The first line the process prints, as JSON."""
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some()
        assert chunk, "the process exited"
        line += chunk
    return json.loads(line)


async def test_every_command_against_two_live_nodes(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a, a_id, (host, a_port) = await start_node(a_dir)
    b, b_id, (_, b_port) = await start_node(b_dir)
    try:
        with trio.fail_after(60):
            rc, status = await control_json(a_dir, "agent", "status")
            assert rc == 0
            assert status["status"] == "LIVE"
            assert status["pid"] == a.pid
            assert status["nodeIdEncoded"] == str(a_id)
            assert (status["host"], status["port"]) == (host, a_port)
            for key in ("startTime", "upTime", "version", "connectionsActive",
                        "nodesTotal", "reflexive", "behindNat", "relay", "served"):  # fmt: skip
                assert key in status, key
            assert status["startTime"].endswith("Z")
            snapshot = status["statistics"]
            for part in ("socket", "server", "rpc", "manager", "finder", "graphWriter"):
                assert part in snapshot, part
            assert snapshot["socket"]["datagrams_received"] >= 0

            # nodes add (pings first), then getall shows it in its bucket.
            rc, added = await control_json(
                a_dir, "nodes", "add", str(b_id), f"{host}:{b_port}"
            )
            assert rc == 0
            assert added["pinged"] is True
            rc, nodes = await control_json(a_dir, "nodes", "getall")
            assert rc == 0
            (entry,) = nodes
            assert entry["nodeIdEncoded"] == str(b_id)
            assert entry["addresses"] == [{"host": host, "port": b_port}]
            assert 0 <= entry["bucketIndex"] <= 255

            rc, ping = await control_json(a_dir, "nodes", "ping", str(b_id))
            assert rc == 0
            assert ping["success"] is True
            assert ping["path"] == "direct"
            assert 0 <= ping["connectMs"] <= ping["rttMs"]
            rc, found = await control_json(a_dir, "nodes", "find", str(b_id))
            assert rc == 0
            assert found["addresses"] == [[host, b_port]]
            assert found["rounds"] >= 1
            assert found["foundRound"] >= 1
            assert found["queries"] >= 1

            rc, connections = await control_json(a_dir, "nodes", "connections")
            assert rc == 0
            (conn,) = connections
            assert conn["nodeIdEncoded"] == str(b_id)
            assert conn["path"] == "direct"
            assert conn["bytesSent"] > 0
            assert conn["rttMs"] is not None
            assert conn["ttlLeftS"] > 0

            # The same in human form: aligned, readable, exit 0.
            b_address = f"{host}:{b_port}"
            for args, shows in (
                (("agent", "status"), str(a_id)),
                (("nodes", "getall"), str(b_id)),
                (("nodes", "connections"), str(b_id)),
                (("nodes", "ping", str(b_id)), f"Node is Active: {b_address}, direct"),
                (("nodes", "find", str(b_id)), f"Found node at {b_address} (round "),
            ):
                rc, out, err = await human(a_dir, *args)
                assert rc == 0, (args, err)
                assert shows in out, (args, out)
            rc, out, _ = await human(a_dir, "agent", "status")
            assert f"nodeId             {a_id}" in out
            # The short forms still work.
            rc, short = await control_json(a_dir, "status")
            assert rc == 0
            assert short["nodeIdEncoded"] == str(a_id)

            # agent stop: ordered, and waits until the node is gone.
            rc, stopped = await control_json(b_dir, "agent", "stop")
            assert rc == 0
            assert stopped["status"] == "STOPPED"
            # Its lock is free: the process is on its way out, cleanly.
            with trio.fail_after(10):
                assert await b.wait() == 0
            rc, dead = await control_json(b_dir, "agent", "status")
            assert rc == EX_UNAVAILABLE
            assert dead["status"] == "DEAD"
            rc, again = await control_json(b_dir, "agent", "stop")
            assert rc == 0
            assert again["status"] == "DEAD"
    finally:
        for process in (a, b):
            if process.returncode is None:
                await stop(process)


async def test_failures_exit_with_their_status_and_one_line(tmp_path: Path) -> None:
    a_dir = tmp_path / "a"
    a, _, _ = await start_node(a_dir)
    absent = str(KeyPair.generate().node_id)
    try:
        with trio.fail_after(90):
            cases = [
                # (state dir, args, exit status, words in the message)
                (tmp_path / "nowhere", ("agent", "status"), EX_UNAVAILABLE, None),
                (tmp_path / "nowhere", ("nodes", "getall"), EX_UNAVAILABLE, "no node is running"),
                (a_dir, ("nodes", "find", "vnope"), EX_DATAERR, "53 characters"),
                (a_dir, ("nodes", "ping", "vnope"), EX_DATAERR, "53 characters"),
                (a_dir, ("nodes", "find", absent), EX_UNAVAILABLE, "not found"),
                (a_dir, ("nodes", "ping", absent), EX_UNAVAILABLE, "not reached"),
                (a_dir, ("nodes", "add", absent, "127.0.0.1:9"), EX_UNAVAILABLE, "did not answer"),
                (a_dir, ("nodes", "add", absent, "[::]:9"), EX_USAGE, "unicast"),
                (a_dir, ("nodes", "frobnicate"), EX_USAGE, "invalid choice"),
            ]  # fmt: skip
            for state_dir, args, status, words in cases:
                rc, out, err = await human(state_dir, *args)
                assert rc == status, (args, rc, out, err)
                assert "Traceback" not in err, args
                if words is not None:
                    # One line (after argparse's usage, for a bad command line).
                    last = err.strip().splitlines()[-1]
                    assert words in last, (args, err)
                    if status != EX_USAGE:
                        assert err.strip() == last, (args, err)
            # --force adds an unreachable node anyway.
            rc, added = await control_json(
                a_dir, "nodes", "add", absent, "127.0.0.1:9", "--force"
            )
            assert rc == 0
            assert added["pinged"] is False
            rc, nodes = await control_json(a_dir, "nodes", "getall")
            assert [n["nodeIdEncoded"] for n in nodes] == [absent]
            # --no-ping adds without asking.
            other = str(KeyPair.generate().node_id)
            rc, added = await control_json(
                a_dir, "nodes", "add", other, "127.0.0.1:9", "--no-ping"
            )
            assert rc == 0
            assert added["pinged"] is None
    finally:
        await stop(a)


async def test_node_json_start_line_and_json_logs(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(tmp_path), "--format", "json", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        with trio.fail_after(20):
            started = await first_json_line(process)
        assert started["stateDir"] == str(tmp_path)
        assert started["controlSocket"] == str(tmp_path / "control.sock")
        # A connection, for its log lines.
        from polykey.keys import NodeId

        from .helpers import dial

        await dial(
            NodeId.from_string(started["nodeIdEncoded"]), ("127.0.0.1", started["port"])
        )
        assert (
            started["seed"] == f"{started['nodeIdEncoded']}@127.0.0.1:{started['port']}"
        )
        assert started["pid"] == process.pid
    finally:
        await stop(process)
    logs = b""
    while chunk := await process.stderr.receive_some():
        logs += chunk
    entries = [json.loads(line) for line in logs.decode().splitlines()]
    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert any("listening on" in e["message"] for e in entries)
    # Once running, every line names the node; a connection's lines carry
    # the peer, its address, the path and the direction as keys.
    stopping = [e for e in entries if "SIGTERM" in e["message"]]
    assert stopping
    assert stopping[0]["nodeId"] == started["nodeIdEncoded"]
    (incoming,) = [e for e in entries if "incoming direct connection" in e["message"]]
    assert incoming["path"] == "direct"
    assert incoming["direction"] == "incoming"
    assert incoming["address"].startswith("127.0.0.1:")
    assert incoming["peer"].startswith("v")
    assert incoming["nodeId"] == started["nodeIdEncoded"]
    ended = [
        e
        for e in entries
        if e.get("peer") == incoming["peer"] and "ended" in e["message"]
    ]
    assert ended
    assert ended[0]["reason"]


async def test_options_from_the_environment(tmp_path: Path) -> None:
    env = {
        "POLYKEY_STATE_DIR": str(tmp_path),
        "POLYKEY_HOST": "127.0.0.1",
        "POLYKEY_PORT": "0",
        "POLYKEY_LOG_LEVEL": "warning",
    }
    import os

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "polykey", "node", "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **env},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            started = await first_json_line(process)
        assert started["stateDir"] == str(tmp_path)
        assert started["host"] == "127.0.0.1"
        result = await trio.run_process(
            [sys.executable, "-m", "polykey", "agent", "status", "-f", "json"],
            capture_stdout=True, env={**os.environ, **env},
        )  # fmt: skip
        assert json.loads(result.stdout)["nodeIdEncoded"] == started["nodeIdEncoded"]
    finally:
        await stop(process)


async def scrape(url: str) -> dict[str, float]:
    """GET ``url``; the samples, by name and labels as written."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_move_with_traffic(tmp_path: Path) -> None:
    from polykey.keys import NodeIdentity
    from polykey.nodes import NodeConnectionManager
    from polykey.quic import QUICSocket
    from polykey.rpc import RPCServer

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "polykey", "node", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(tmp_path), "--format", "json", "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(30):
            started = await first_json_line(process)
            url = started["metrics"]
            before = await scrape(url)
            assert before["polykey_graph_nodes"] == 0
            assert before['polykey_connections{path="direct"}'] == 0
            async with (
                QUICSocket("127.0.0.1") as sock,
                RPCServer({}) as rpc,
                trio.open_nursery() as nursery,
            ):
                manager = NodeConnectionManager(sock, NodeIdentity.generate(), rpc)
                await nursery.start(manager.run)
                from polykey.keys import NodeId

                conn = await manager.connect(
                    NodeId.from_string(started["nodeIdEncoded"]),
                    ("127.0.0.1", started["port"]),
                )
                for _ in range(3):
                    await conn.rpc.unary("nodesPing", {})
                during = await scrape(url)
                nursery.cancel_scope.cancel()
            assert during['polykey_rpc_calls_total{method="nodesPing"}'] == 3
            assert during['polykey_quic_handshakes_total{outcome="accepted"}'] == 1
            assert during['polykey_connections{path="direct"}'] == 1
            received = 'polykey_quic_datagrams_total{direction="received"}'
            assert during[received] > before[received]
            assert during["polykey_graph_nodes"] == 1
            # No bug was caught anywhere, and each layer says so.
            bugs = {k: v for k, v in during.items() if k.startswith("polykey_bugs")}
            assert sorted(bugs) == [
                f'polykey_bugs_total{{where="{w}"}}'
                for w in sorted(["quic", "rpc_handler", "rpc_server",
                                 "connections", "node_manager", "node"])
            ]  # fmt: skip
            assert set(bugs.values()) == {0}
            # The client only dialled in: gone, it is dialled back, in vain.
            failed = 'polykey_dialbacks_total{outcome="failed"}'
            assert during[failed] == 0
            with trio.fail_after(15):
                while (after := await scrape(url))[failed] == 0:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert after['polykey_dialbacks_total{outcome="started"}'] == 1
            assert after['polykey_dialbacks_total{outcome="confirmed"}'] == 0
            assert after["polykey_graph_nodes"] == 0
            # Anything but /metrics is 404.
            host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
                assert (await stream.receive_some()).startswith(b"HTTP/1.0 404")
    finally:
        await stop(process)


async def test_keys_show_and_renew(tmp_path: Path) -> None:
    from polykey.keys import NodeId, NodeIdentity
    from polykey.nodes import NodeConnectionManager
    from polykey.quic import QUICSocket
    from polykey.rpc import RPCServer

    from .helpers import dial

    state = tmp_path / "a"
    a, old_id, address = await start_node(state)
    other, other_id, other_address = await start_node(tmp_path / "b")
    try:
        with trio.fail_after(60):
            rc, shown = await control_json(state, "keys", "show")
            assert rc == 0
            assert shown["nodeIdEncoded"] == str(old_id)
            assert shown["chainValid"] is True
            assert [c["nodeIdEncoded"] for c in shown["certificates"]] == [str(old_id)]
            rc, out, _ = await human(state, "keys", "show")
            assert rc == 0
            assert f"nodeId   {old_id}" in out
            assert "chain    valid" in out
            # The graph learns of another node, then renewal needs the node
            # stopped.
            rc, _ = await control_json(
                state,
                "nodes",
                "add",
                str(other_id),
                f"{other_address[0]}:{other_address[1]}",
            )
            assert rc == 0
            rc, _, err = await human(state, "keys", "renew")
            assert rc == 75  # EX_TEMPFAIL
            assert "in use by another node" in err
            await stop(a)
            rc, renewed = await control_json(state, "keys", "renew")
            assert rc == 0
            new_id = NodeId.from_string(renewed["nodeIdEncoded"])
            assert renewed["previousNodeIdEncoded"] == str(old_id)
            assert new_id != old_id
            assert [c["nodeIdEncoded"] for c in renewed["certificates"]] == [
                str(new_id),
                str(old_id),
            ]
            # The node comes back as the new NodeId, with its graph, and a
            # peer that knew the old NodeId still reaches and verifies it.
            a, again, address = await start_node(state, "--port", "0")
            assert again == new_id
            rc, nodes = await control_json(state, "nodes", "getall")
            assert [n["nodeIdEncoded"] for n in nodes] == [str(other_id)]
            await dial(new_id, address)
            async with (
                QUICSocket("127.0.0.1") as sock,
                RPCServer({}) as rpc,
                trio.open_nursery() as nursery,
            ):
                peer = NodeConnectionManager(sock, NodeIdentity.generate(), rpc)
                await nursery.start(peer.run)
                conn = await peer.connect(old_id, address)
                # It walked the chain to the old NodeId; the node is the new.
                assert conn.connection.peer_identity == new_id
                nursery.cancel_scope.cancel()
    finally:
        for process in (a, other):
            if process.returncode is None:
                await stop(process)


async def test_progress_on_a_terminal_not_on_a_pipe(tmp_path: Path) -> None:
    """A find that takes a while (three dead nodes in the graph) shows its
    rounds on a terminal's stderr, and nothing when stderr is a pipe."""
    import os
    import pty

    from polykey.keys import KeyPair

    state = tmp_path / "a"
    a, _, _ = await start_node(state)
    try:
        with trio.fail_after(60):
            for port in (9, 10, 11):
                dead = str(KeyPair.generate().node_id)
                rc, _ = await control_json(
                    state, "nodes", "add", dead, f"127.0.0.1:{port}", "--no-ping"
                )
                assert rc == 0
            absent = str(KeyPair.generate().node_id)
            argv = [sys.executable, "-m", "polykey", "nodes", "find", absent,
                    "--state-dir", str(state)]  # fmt: skip
            # On a terminal.
            leader, follower = pty.openpty()
            try:
                process = await trio.lowlevel.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=follower,
                )
                os.close(follower)
                assert await process.wait() == EX_UNAVAILABLE
                seen = b""
                while True:
                    try:
                        chunk = os.read(leader, 65536)
                    except OSError:  # EIO: the terminal's other side is closed
                        break
                    if not chunk:
                        break
                    seen += chunk
            finally:
                os.close(leader)
            assert b"round " in seen, seen
            assert b"asked" in seen
            # On a pipe: the error line only.
            rc, _, err = await human(state, "nodes", "find", absent)
            assert rc == EX_UNAVAILABLE
            assert "round" not in err
            assert err.strip() == f"polykey: {absent}: not found"
    finally:
        await stop(a)
