"""Control methods sent no params object (null, a list, a string: raw
JSON-RPC on control.sock) answer invalid-params (-32602), never an
internal error with a traceback in the node's log (found by tests/fuzz)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey._control import CONTROL_SOCKET
from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import KeyPair


async def raw_call(path: Path, method: str, params: Any) -> Any:
    request = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps(request).encode())
        await stream.send_eof()
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
    return json.loads(reply)


@pytest.mark.parametrize("params", [None, [], "v", 7])
async def test_bad_params_are_invalid_params(
    tmp_path: Path, params: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    with trio.fail_after(30):
        async with PolykeyNode(settings):
            path = tmp_path / CONTROL_SOCKET
            for method in ("nodesFind", "nodesPingNode", "nodesAdd"):
                reply = await raw_call(path, method, params)
                assert reply["error"]["code"] == -32602, reply
            status = await raw_call(path, "agentStatus", {})
            assert status["result"]["status"] == "LIVE"
    assert "failed unexpectedly" not in caplog.text


async def test_bad_params_are_one_error_naming_the_key(tmp_path: Path) -> None:
    """Each control method reads its params through its class
    (polykey/_control_params.py): the first bad key, in our words."""
    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    with trio.fail_after(30):
        async with PolykeyNode(settings) as node:
            own = str(node.node_id)
            other = str(KeyPair.generate().node_id)
            good = {"nodeIdEncoded": other, "host": "127.0.0.1", "port": 9}
            cases: list[tuple[str, Any, str]] = [
                ("nodesFind", {}, "nodeIdEncoded is missing"),
                ("nodesFind", {"nodeIdEncoded": 5}, "nodeIdEncoded must be a string"),
                ("nodesFind", {"nodeIdEncoded": {"nodeIdEncoded": other}},
                 "nodeIdEncoded must be a string"),
                ("nodesFind", {"nodeIdEncoded": "vnope"},
                 "nodeIdEncoded is not a NodeId: encoded NodeId must be 53"
                 " characters, got 5: 'vnope'"),
                ("nodesPingNode", {"nodeIdEncoded": [other]},
                 "nodeIdEncoded must be a string"),
                ("nodesPingNode", {"nodeIdEncoded": own},
                 "that is this node's own NodeId"),
                ("nodesAdd", {**good, "port": 10**400},
                 "port must be a port number (1-65535)"),
                ("nodesAdd", {**good, "port": "9"}, "port must be a port number (1-65535)"),
                ("nodesAdd", {**good, "port": True}, "port must be a port number (1-65535)"),
                ("nodesAdd", {**good, "host": 5}, "host must be a string"),
                ("nodesAdd", {**good, "host": "0.0.0.0"},
                 "host is not dialable: '0.0.0.0' is not a unicast address"),
                ("nodesAdd", {"nodeIdEncoded": other, "port": 9}, "host is missing"),
                ("nodesAdd", {**good, "ping": "no"}, "ping must be true or false"),
                ("nodesAdd", {**good, "force": 1}, "force must be true or false"),
                ("nodesAdd", {**good, "nodeIdEncoded": own},
                 "that is this node's own NodeId"),
                ("agentStatus", [], "params must be a JSON object"),  # the server's check
            ]  # fmt: skip
            path = tmp_path / CONTROL_SOCKET
            for method, params, message in cases:
                reply = await raw_call(path, method, params)
                assert reply["error"]["code"] == -32602, (method, params, reply)
                assert reply["error"]["message"] == message, (method, params)
            # Keys a method does not know are ignored (js-rpc's metadata).
            status = await raw_call(path, "agentStatus", {"metadata": {"x": 1}})
            assert status["result"]["status"] == "LIVE"
