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
