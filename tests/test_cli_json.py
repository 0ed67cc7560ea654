"""``--format json`` of every CLI command keeps the keys docs/cli.md lists,
in order: the commands run in process against two live nodes, and what
they print is parsed back."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey import _cli_control as cli
from polykey.agent import NodeSettings, PolykeyNode
from polykey.cli import _print_started
from polykey.keys import NodeId

STATUS = ["status", "pid", "version", "nodeIdEncoded", "host", "port",
          "startTime", "upTime", "connectionsActive", "nodesTotal", "graphSize",
          "connections", "reflexive", "behindNat", "relay", "served",
          "statistics", "control"]  # fmt: skip
LINK = ["nodeIdEncoded", "host", "port", "path", "outgoing"]
SERVED = ["rpcCalls", "lookups", "finds"]
CONTROL = ["clients", "accepted", "refusedBusy", "acceptErrors", "timeouts", "bugs"]
ADD = ["nodeIdEncoded", "host", "port", "added", "pinged"]
FIND = ["nodeIdEncoded", "addresses", "rounds", "foundRound", "queries", "failures"]
PING = ["nodeIdEncoded", "success", "path", "host", "port", "pooled",
        "connectMs", "rttMs"]  # fmt: skip
PING_FAILED = ["nodeIdEncoded", "success", "error"]
GRAPH_ENTRY = ["nodeIdEncoded", "bucketIndex", "addresses", "lastSeen"]
CONNECTION = ["nodeIdEncoded", "host", "port", "path", "outgoing", "ageS",
              "ttlLeftS", "streams", "bytesSent", "bytesReceived", "rttMs"]  # fmt: skip
STOP = ["status", "pid"]
DEAD = ["status", "stateDir"]
CERTIFICATE = ["nodeIdEncoded", "notBefore", "notAfter"]
KEYS_SHOW = ["nodeIdEncoded", "keyFile", "chainValid", "chainError", "certificates"]
KEYS_RENEW = ["previousNodeIdEncoded", "nodeIdEncoded", "certificates"]
STARTED = ["nodeIdEncoded", "host", "port", "seed", "stateDir", "controlSocket",
           "pid", "metrics", "note"]  # fmt: skip


async def run(command: Callable[..., Awaitable[int]], *args: object) -> tuple[int, Any]:
    out, err = io.StringIO(), io.StringIO()
    status = await cli.run_command(command, *args[:1], "json", out, *args[1:], err=err)
    return status, json.loads(out.getvalue())


def keys(value: Any) -> list[str]:
    assert isinstance(value, dict), value
    return list(value)


async def _serve(settings: NodeSettings, task_status: Any) -> None:
    """A node that runs until ``agent stop`` asks it to stop."""
    async with PolykeyNode(settings) as node:
        task_status.started(node)
        await node.stop_requested.wait()


async def test_every_command_prints_the_documented_keys(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every answer is read through its class and written back: what the CLI
    # prints must be exactly what the node sent.
    answers: list[Any] = []
    call_json = cli._call_json

    async def recording(*args: Any) -> Any:
        answers.append(await call_json(*args))
        return answers[-1]

    monkeypatch.setattr(cli, "_call_json", recording)

    def sent(printed: Any, key: str | None = None) -> bool:
        last = answers[-1] if key is None else answers[-1][key]
        return bool(printed == last)

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a: PolykeyNode = await nursery.start(
                _serve, NodeSettings(state_dir=a_dir, host="127.0.0.1", port=0)
            )
            b: PolykeyNode = await nursery.start(
                _serve, NodeSettings(state_dir=b_dir, host="127.0.0.1", port=0)
            )
            host, b_port = b.address

            _print_started(a, "json")
            started = json.loads(capsys.readouterr().out)
            assert keys(started) == STARTED

            status, added = await run(
                cli.nodes_add, a_dir, str(b.node_id), host, b_port, True, False
            )
            assert status == 0
            assert keys(added) == ADD
            assert sent(added)

            status, info = await run(cli.agent_status, a_dir)
            assert status == 0
            assert keys(info) == STATUS
            assert sent(info)
            assert [keys(c) for c in info["connections"]] == [LINK]
            assert all(keys(r) == ["host", "port"] for r in info["reflexive"])
            assert keys(info["served"]) == SERVED
            assert keys(info["control"]) == CONTROL

            status, nodes = await run(cli.nodes_getall, a_dir)
            assert status == 0
            assert [keys(n) for n in nodes] == [GRAPH_ENTRY]
            assert sent(nodes, "nodes")
            assert [keys(x) for x in nodes[0]["addresses"]] == [["host", "port"]]

            status, connections = await run(cli.nodes_connections, a_dir)
            assert status == 0
            assert [keys(c) for c in connections] == [CONNECTION]
            assert sent(connections, "connections")

            status, pinged = await run(cli.nodes_ping, a_dir, str(b.node_id))
            assert status == 0
            assert keys(pinged) == PING  # pooled: no attemptMs
            assert sent(pinged)

            status, found = await run(cli.nodes_find, a_dir, str(b.node_id))
            assert status == 0
            assert keys(found) == FIND
            assert sent(found)
            assert found["addresses"] == [[host, b_port]]
            # Our own NodeId: found without a lookup, the same keys.
            status, own = await run(cli.nodes_find, a_dir, str(a.node_id))
            assert status == 0
            assert keys(own) == FIND
            assert (own["rounds"], own["queries"], own["failures"]) == (0, 0, 0)

            stranger = str(NodeId(bytes(32)))
            status, missed = await run(cli.nodes_ping, a_dir, stranger)
            assert status == cli.EX.UNAVAILABLE
            assert keys(missed) == PING_FAILED
            assert sent(missed)

            status, stopped = await run(cli.agent_stop, b_dir)
            assert status == 0
            assert keys(stopped) == STOP
            assert stopped["status"] == "STOPPED"
            status, dead = await run(cli.agent_status, b_dir)
            assert status == cli.EX.UNAVAILABLE
            assert keys(dead) == DEAD
            status, dead = await run(cli.agent_stop, b_dir)
            assert status == 0
            assert keys(dead) == DEAD

            nursery.cancel_scope.cancel()

    status, shown = await run(cli.keys_show, b_dir)
    assert status == 0
    assert keys(shown) == KEYS_SHOW
    assert [keys(c) for c in shown["certificates"]] == [CERTIFICATE]
    status, renewed = await run(cli.keys_renew, b_dir)
    assert status == 0
    assert keys(renewed) == KEYS_RENEW
    assert [keys(c) for c in renewed["certificates"]] == [CERTIFICATE, CERTIFICATE]


@pytest.mark.parametrize(
    ("command", "args", "answer", "why"),
    [
        (cli.nodes_find, ("x",), {"nodeIdEncoded": "x"}, "required field missing @ .addresses"),
        (cli.nodes_find, ("x",), [], "not a JSON object"),
        (cli.agent_stop, (), {"status": "STOPPING", "pid": "12"}, "expected int @ .pid"),
        (cli.nodes_ping, ("x",), {"success": True, "nodeIdEncoded": "x"}, "NodesPing"),
        (cli.nodes_ping, ("x",), {"success": 1}, "NodesPingFailed"),
        # The success key tells the two shapes apart: it must be a boolean.
        (cli.nodes_ping, ("x",), {"nodeIdEncoded": "x", "error": "e"},
         "success must be true or false"),
        (cli.nodes_ping, ("x",), {"success": "false", "nodeIdEncoded": "x", "error": "e"},
         "success must be true or false"),
        (cli.nodes_ping, ("x",), {"success": False, "nodeIdEncoded": "x"},
         "not a NodesPingFailed: required field missing @ .error"),
        (cli.nodes_getall, (), {"nodes": [{"bucketIndex": True}]}, "expected int @ .nodes[0].bucketIndex"),
    ],
)  # fmt: skip
async def test_a_malformed_answer_is_one_line_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: Callable[..., Awaitable[int]],
    args: tuple[object, ...],
    answer: Any,
    why: str,
) -> None:
    async def answering(*_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return answer

    monkeypatch.setattr(cli, "_call_json", answering)
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(10):
        status = await cli.run_command(command, tmp_path, "json", out, *args, err=err)
    assert status == cli.EX.SOFTWARE
    assert out.getvalue() == ""
    [line] = err.getvalue().splitlines()
    assert line.startswith("polykey: the node's answer to ")
    assert why in line
