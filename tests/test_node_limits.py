"""A node's limits (NodeLimits, ``node --max-...``) and its bugs kept to
the call or connection they happened in; real nodes on loopback."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey.agent import NodeLimits, NodeSettings, PolykeyNode, SeedNode
from polykey.cli import _limits, build_parser
from polykey.nodes import NodeConnection, NodeManager
from polykey.rpc import CallContext, RPCRemoteError, UnaryHandler

JSON = dict[str, Any]


class Buggy(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        raise AttributeError("'NoneType' object has no attribute 'secret'")


class Echo(UnaryHandler[JSON, JSON]):
    async def handle(self, params: JSON, ctx: CallContext) -> JSON:
        return {"echo": params.get("x")}


@asynccontextmanager
async def nodes(
    tmp_path: Path, hosts: list[str], **settings: Any
) -> AsyncIterator[list[PolykeyNode]]:
    """A node on 127.0.0.1 with ``settings``, then one on each of ``hosts``."""
    async with AsyncExitStack() as stack:
        running = [
            await stack.enter_async_context(
                PolykeyNode(
                    NodeSettings(
                        state_dir=tmp_path / "a", host="127.0.0.1", port=0, **settings
                    )
                )
            )
        ]
        for i, host in enumerate(hosts):
            running.append(
                await stack.enter_async_context(
                    PolykeyNode(
                        NodeSettings(state_dir=tmp_path / str(i), host=host, port=0)
                    )
                )
            )
        yield running


async def connect(
    node: PolykeyNode, to: PolykeyNode, within: float = 10
) -> NodeConnection | None:
    with trio.move_on_after(within):
        return await node.connect(to.node_id, to.address)
    return None


async def test_node_limits_reach_the_quic_server_and_rpc_server(
    tmp_path: Path,
) -> None:
    limits = NodeLimits(
        max_connections_per_address=1, max_calls_per_connection=3, dialback_queue=5
    )
    with trio.fail_after(60):
        async with nodes(
            tmp_path,
            ["127.0.0.1", "127.0.0.1", "127.0.0.2"],
            limits=limits,
            handlers={"echo": Echo()},
        ) as (a, b, c, d):
            assert await connect(b, a) is not None
            assert await connect(c, a, within=1.5) is None  # b's address is full
            server = a.connections.statistics()["server"]
            assert server["refused_connections_per_address"] >= 1
            conn = await connect(d, a)  # another address
            assert conn is not None
            assert await conn.rpc.unary("echo", {"x": 1}) == {"echo": 1}
            assert a.rpc_server.max_calls_per_connection == 3
            assert a.rpc_server.max_calls == limits.max_calls
            assert a.manager.config.dialback_queue == 5
            assert a.manager.config.dialback_limit == limits.dialback_limit


async def test_a_handlers_bug_answers_internal_error_and_the_node_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = {"buggy": Buggy(), "echo": Echo()}
    with trio.fail_after(60):
        async with nodes(tmp_path, ["127.0.0.1"], handlers=handlers) as (a, b):
            conn = await connect(b, a)
            assert conn is not None
            with pytest.raises(RPCRemoteError) as info:
                await conn.rpc.unary("buggy", {})
            assert info.value.remote_code == -32603
            assert "secret" not in str(info.value)
            assert "AttributeError" not in str(info.value)
            assert await conn.rpc.unary("echo", {"x": 1}) == {"echo": 1}
            assert a.rpc_server.statistics().handler_bugs == 1
    [warning] = [
        r
        for r in caplog.records
        if r.name == "polykey.rpc" and r.levelno == logging.WARNING
    ]
    assert str(b.node_id) in warning.getMessage()


async def test_a_failing_connection_callback_does_not_end_the_node(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handlers = {"echo": Echo()}
    with trio.fail_after(60):
        async with nodes(tmp_path, ["127.0.0.1", "127.0.0.2"], handlers=handlers) as (
            a,
            b,
            c,
        ):

            def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("a bug in the graph's bookkeeping")

            monkeypatch.setattr(a.manager, "note_connection", broken)
            monkeypatch.setattr(a.manager, "note_disconnect", broken)
            conn = await connect(b, a)
            assert conn is not None
            assert await conn.rpc.unary("echo", {"x": 1}) == {"echo": 1}
            # The one that dialled closes: a's disconnect callback fails too.
            await conn.connection.aclose()
            with trio.fail_after(10):
                while a.connections.task_errors < 2:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            # The node still serves, a new peer and the old one alike.
            for peer in (c, b):
                again = await connect(peer, a)
                assert again is not None
                assert await again.rpc.unary("echo", {"x": 2}) == {"echo": 2}
            # Two new connections, two more failed callbacks.
            with trio.fail_after(10):
                while a.connections.statistics()["task_errors"] < 4:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert a.connections.task_errors == 4

            # A task of the connection manager's (a punch, a relay circuit's
            # watcher, an anchor) failing is the same.
            async def fails(peer: object) -> None:
                await trio.lowlevel.checkpoint()
                raise KeyError("lost track")

            a.connections.spawn(fails, c.node_id)
            with trio.fail_after(10):
                while a.connections.task_errors < 5:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            again = await connect(b, a)
            assert again is not None
            assert await again.rpc.unary("echo", {"x": 3}) == {"echo": 3}
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "polykey.nodes.connections" and r.levelno == logging.WARNING
    ]
    assert any("connection callback" in w and str(b.node_id) in w for w in warnings)
    assert any("disconnect callback" in w for w in warnings)
    assert any("fails" in w and str(c.node_id) in w for w in warnings)


async def test_a_bug_run_for_a_peers_datagram_does_not_end_the_node(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The node's DATAGRAM handler (relaying) runs from the socket's reader:
    # before, its exception ended the reader, the socket and the node.
    handlers = {"echo": Echo()}
    with trio.fail_after(60):
        async with nodes(tmp_path, ["127.0.0.1", "127.0.0.2"], handlers=handlers) as (
            a,
            b,
            c,
        ):

            def broken(sender: object, data: bytes) -> None:
                raise IndexError("a bug in relaying")

            monkeypatch.setattr(a.connections._relaying, "datagram", broken)
            conn = await connect(b, a)
            assert conn is not None
            assert conn.connection.send_datagram(bytes(20))
            stats = a.connections.socket.statistics
            with trio.fail_after(10):
                while stats.unexpected_errors < 1:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert await conn.rpc.unary("echo", {"x": 1}) == {"echo": 1}
            again = await connect(c, a)
            assert again is not None
            assert await again.rpc.unary("echo", {"x": 2}) == {"echo": 2}
            assert stats.unexpected_errors == 1
    [warning] = [
        r
        for r in caplog.records
        if r.name == "polykey.quic" and r.levelno == logging.WARNING
    ]
    assert "DATAGRAM handler" in warning.getMessage()
    assert str(b.node_id) in warning.getMessage()


async def test_a_bug_in_a_reservation_or_a_forwarded_signal_is_told(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both swallowed every exception at DEBUG: a bug of ours looked like a
    # relay that refused, or a target that did not answer.
    with trio.fail_after(60):
        async with nodes(tmp_path, ["127.0.0.1"]) as (a, b):
            conn = await connect(a, b)
            assert conn is not None
            assert a.connections.get(b.node_id) is conn

            async def broken(*args: object, **kwargs: object) -> object:
                raise TypeError("a bug on our side of the call")

            monkeypatch.setattr(conn.rpc, "unary", broken)
            assert await a.connections.reserve(conn) is None
            assert a.connections.task_errors == 1
            a.connections.forward_signal(b.node_id, {})
            with trio.fail_after(10):
                while a.connections.task_errors < 2:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert a.connections.statistics()["signal_failures"] == 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "polykey.nodes.connections" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    assert all(str(b.node_id) in w for w in warnings)
    assert "reservation on" in warnings[0]
    assert "signal to" in warnings[1]


def test_limit_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["node", "--max-connections", "200", "--handshake-rate", "2.5"]
    )
    assert _limits(args, parser) == NodeLimits(max_connections=200, handshake_rate=2.5)
    assert _limits(parser.parse_args(["node"]), parser) == NodeLimits()
    monkeypatch.setenv("POLYKEY_MAX_CALLS_PER_CONNECTION", "8")
    monkeypatch.setenv("POLYKEY_CONTROL_CLIENTS", "4")
    parser = build_parser()
    args = parser.parse_args(
        ["node", "--control-clients", "2", "--dialback-limit", "0"]
    )
    assert _limits(args, parser) == NodeLimits(
        max_calls_per_connection=8, control_clients=2, dialback_limit=0
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max-connections", "0"], "--max-connections"),
        (["--max-calls", "lots"], "--max-calls"),
        (["--handshake-rate", "-1"], "--handshake-rate"),
        (["--max-streams-uni", "-1"], "--max-streams-uni"),
    ],
)
def test_bad_limits_exit_with_one_line(
    tmp_path: Path, argv: list[str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polykey", "node", "--state-dir", str(tmp_path), *argv],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 64  # EX_USAGE
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1
    assert named in errors[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # refused before anything started


def test_node_limits_replace_the_quic_settings() -> None:
    limits = NodeLimits(
        max_streams=7,
        connection_credit=1000,
        handshake_rate=3.0,
        retry_threshold=0,
        retry_threshold_per_address=5,
    )
    quic = limits.quic_config(NodeSettings().quic)
    assert (quic.retry_threshold, quic.retry_threshold_per_address) == (0, 5)
    assert quic.initial_max_streams_bidi == 7
    assert quic.initial_max_streams_uni == 0
    assert quic.initial_max_data == 1000
    assert quic.handshake_rate == 3.0
    assert quic.max_connections == limits.max_connections
    assert quic.datagram_queue == NodeSettings().quic.datagram_queue  # kept


def test_node_limits_replace_the_dialback_settings() -> None:
    base = NodeSettings().nodes
    nodes = NodeLimits(dialback_limit=0, dialback_queue=5).nodes_config(base)
    assert (nodes.dialback_limit, nodes.dialback_queue) == (0, 5)
    assert nodes.query_timeout == base.query_timeout  # kept
    assert NodeLimits().nodes_config(base) == base  # the defaults agree


@pytest.mark.parametrize("failure", ["network", "bug"])
async def test_a_failed_join_is_one_warning_and_a_bug_is_counted(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """The join's failures: the network's is one WARNING line, a bug of ours
    a WARNING with its traceback, counted; never ERROR, and the node serves
    on either way (wait_joined() returns)."""

    async def join(self: NodeManager, seeds: object) -> None:
        await trio.lowlevel.checkpoint()
        if failure == "network":
            raise OSError("network is unreachable")
        raise KeyError("lost track")

    monkeypatch.setattr(NodeManager, "join", join)
    with trio.fail_after(60):
        async with nodes(tmp_path, []) as (seed,):
            settings = NodeSettings(
                state_dir=tmp_path / "joiner",
                host="127.0.0.1",
                port=0,
                seeds=(SeedNode(seed.node_id, *seed.address),),
            )
            async with PolykeyNode(settings) as joiner:
                assert await joiner.wait_joined() is None
                conn = await connect(seed, joiner)
                assert conn is not None
                pong = await conn.rpc.unary("nodesPing", {})
                assert pong["success"] is True
                bugs = joiner.bugs
    records = [
        r for r in caplog.records if "joining through the seeds" in r.getMessage()
    ]
    assert [r.levelno for r in records] == [logging.WARNING]
    if failure == "network":
        assert "network is unreachable" in records[0].getMessage()
        assert records[0].exc_info is None
        assert bugs == 0
    else:
        assert "a bug" in records[0].getMessage()
        assert records[0].exc_info is not None
        assert bugs == 1
