"""Interoperability with @matrixai/rpc 0.5.1 over TCP, both directions.

peer.js (next to this file) runs js-rpc's RPCServer or RPCClient over a
net.Socket.  These tests skip when node or tests/interop/node_modules is
missing (install with ``npm ci`` in tests/interop).  Real clock throughout.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from polykey.rpc import (
    RPCClient,
    RPCError,
    RPCRemoteError,
    RPCRemoteTimedOut,
    RPCServer,
    RPCTimedOut,
)
from tests.rpc.helpers import Chat, Count, Echo, Fail, RawEcho, Sleep, Sum

HERE = Path(__file__).parent
PEER = HERE / "peer.js"
NODE_MODULES = HERE.parent / "node_modules" / "@matrixai" / "rpc"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not NODE_MODULES.is_dir(),
        reason="@matrixai/rpc is not installed: run `npm ci` in tests/interop",
    ),
]

JSON = dict[str, Any]


@asynccontextmanager
async def js_server(timeout_ms: int | None = None) -> AsyncIterator[int]:
    """Run peer.js as a js-rpc server; yield its TCP port."""
    args = [str(NODE), str(PEER), "server"]
    if timeout_ms is not None:
        args.append(str(timeout_ms))
    proc = await trio.lowlevel.open_process(args, stdin=-1, stdout=-1)
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(15):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some()
                assert chunk, "peer.js exited before printing its port"
                buf += chunk
        yield int(buf.split()[1])
    finally:
        assert proc.stdin is not None
        await proc.stdin.aclose()  # peer.js exits when stdin closes
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def tcp_client(port: int, **kwargs: Any) -> RPCClient[Any]:
    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    # pace: js-rpc 0.5.1 drops messages that share a read with the header.
    return RPCClient(None, connect, pace=0.05, **kwargs)


# ---- our client, their server ---------------------------------------------


async def test_our_client_all_call_types() -> None:
    with trio.fail_after(30):
        async with js_server() as port:
            client = tcp_client(port)
            out = await client.unary("echo", {"a": 1})
            assert out["echo"]["a"] == 1
            # the caller's deadline went along in the metadata (ms)
            assert 0 < out["echo"]["metadata"]["timeout"] <= 30_000

            async with client.server_stream("count", {"n": 4}) as results:
                assert [r async for r in results] == [{"i": i} for i in range(4)]

            async with client.client_stream("sum") as call:
                for x in range(1, 5):
                    await call.send({"x": x})
                assert await call.finish() == {"sum": 10}

            async with client.duplex("chat") as call:
                for x in range(3):
                    await call.send({"x": x})
                    assert await call.receive() == {"re": x}
                await call.send_eof()
                assert [r async for r in call] == []

            async with client.raw("rawEcho", {"x": 1}) as raw:
                assert raw.header == {"hello": {"x": 1}}
                await raw.stream.send_all(b"raw bytes")
                await raw.stream.send_eof()
                body = b""
                while data := await raw.stream.receive_some():
                    body += data
            assert body == b"RAW BYTES"


async def test_our_client_errors() -> None:
    with trio.fail_after(30):
        async with js_server() as port:
            client = tcp_client(port)
            with pytest.raises(RPCRemoteError) as info:
                await client.unary("fail", {})
            assert info.value.remote_type == "TypeError"
            assert info.value.remote_message == "js says no"
            assert isinstance(info.value.error, TypeError)
            # js-rpc answers an unknown method by closing the stream
            with pytest.raises(RPCError):
                await client.unary("nope", {})
            # and keeps serving
            assert (await client.unary("echo", {}))["echo"]["metadata"]


async def test_our_client_timeouts() -> None:
    with trio.fail_after(30):
        async with js_server() as port:
            client = tcp_client(port)
            # ours is shorter: our scope fires, the stream is closed
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                await client.unary("sleep", {"ms": 5000}, rpc_timeout=0.3)
            assert trio.current_time() - start < 2
            # theirs is shorter (handler-declared 300 ms): their timeout error
            start = trio.current_time()
            with pytest.raises(RPCRemoteTimedOut) as info:
                await client.unary("sleepDeclared", {"ms": 5000}, rpc_timeout=math.inf)
            assert info.value.remote_type == "ErrorRPCTimedOut"
            assert trio.current_time() - start < 2
            # proof of life: a stream outlives a short timeout once it has started
            async with client.server_stream(
                "count", {"n": 50}, rpc_timeout=0.1
            ) as results:
                assert len([r async for r in results]) == 50


async def test_their_server_default_timeout() -> None:
    with trio.fail_after(30):
        async with js_server(timeout_ms=300) as port:
            client = tcp_client(port)
            with pytest.raises(RPCRemoteTimedOut):
                await client.unary("sleep", {"ms": 5000})
            assert (await client.unary("sleep", {"ms": 10}))["slept"] == 10


# ---- their client, our server (the handlers of tests/rpc/helpers.py) ------


async def run_js_client(port: int) -> dict[str, JSON]:
    result = await trio.run_process(
        [str(NODE), str(PEER), "client", str(port)], capture_stdout=True
    )
    lines = result.stdout.decode().splitlines()
    return {check["name"]: check for check in map(json.loads, lines)}


async def test_their_client_against_our_server() -> None:
    manifest = {
        "echo": Echo(),
        "count": Count(),
        "sum": Sum(),
        "chat": Chat(),
        "rawEcho": RawEcho(),
        "fail": Fail(TypeError("py says no")),
        "sleep": Sleep(),
        "slowDeclared": Sleep(timeout=0.3),
    }
    with trio.fail_after(60):
        async with (
            RPCServer(manifest, linger=2) as server,
            trio.open_nursery() as nursery,
        ):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def serve(stream: trio.SocketStream) -> None:
                await server.serve_stream(stream, {"transport": "tcp"})

            nursery.start_soon(trio.serve_listeners, serve, listeners)
            checks = await run_js_client(port)
            nursery.cancel_scope.cancel()

    def ok(name: str) -> Any:
        check = checks[name]
        assert check["ok"], check
        return check["value"]

    def err(name: str) -> JSON:
        check = checks[name]
        assert not check["ok"], check
        return check["error"]  # type: ignore[no-any-return]

    assert ok("unary") == {"echo": {"a": 1}, "meta": {"timeout": None}}
    assert ok("unaryTimer") == {"echo": {"a": 2}, "meta": {"timeout": 4000}}
    assert ok("server") == [{"i": i} for i in range(4)]
    assert ok("client") == {"sum": 10}
    assert ok("duplex") == [
        {"re": {"x": 1}},
        {"re": {"x": 2}},
        {"re": {"x": 3}},
        "done",
    ]
    assert ok("raw") == {"header": {"hello": {"x": 1}}, "body": "RAW BYTES"}
    # TypeError is a type js-rpc knows: rebuilt and wrapped, like its own
    error = err("error")
    assert error["class"] == "ErrorRPCRemote"
    assert error["cause"] == {"class": "TypeError", "message": "py says no"}
    # an unknown method is answered with an error, not silence
    error = err("unknown")
    assert error["class"] == "plain"
    assert error["value"]["type"] == "ErrorRPCMethodNotFound"
    # timeouts: their client's 300 ms went into the metadata; we answered
    # with ErrorRPCTimedOut, which their client rebuilds
    for name in ("clientTimeout", "handlerTimeout"):
        error = err(name)
        assert error["class"] == "ErrorRPCRemote", error
        assert error["cause"]["class"] == "ErrorRPCTimedOut"
        assert checks[name]["ms"] < 1000
