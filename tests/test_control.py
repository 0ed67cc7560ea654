"""The control socket under clients that connect and say nothing: a cap on
clients served at once, a deadline for the request, and ``accept()`` out of
file descriptors waited out instead of ending the node."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

import polykey._control as control
from polykey._control import CONTROL_SOCKET, control_client
from polykey.agent import NodeLimits, NodeSettings, PolykeyNode


def open_idle(path: Path, n: int) -> list[socket.socket]:
    """``n`` clients connected to ``path`` that will never send a byte; the
    ones the kernel's listen queue had no room for are left out."""
    clients = []
    for _ in range(n):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(str(path))
        except BlockingIOError:  # the listen queue is full
            client.close()
            continue
        clients.append(client)
    return clients


async def closed_after(client: socket.socket, start: float, out: list[float]) -> None:
    """Append how long after ``start`` the server closed ``client``."""
    while True:
        await trio.lowlevel.wait_readable(client)
        try:
            if client.recv(4096) == b"":
                break
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
    out.append(trio.current_time() - start)
    client.close()


async def close_times(clients: list[socket.socket]) -> list[float]:
    start = trio.current_time()
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(closed_after, client, start, times)
    return sorted(times)


async def node_status(state_dir: Path) -> Any:
    with trio.fail_after(10):
        return await control_client(state_dir).unary("nodeStatus", {})


async def test_extra_clients_are_closed_at_once_idle_ones_after_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 1.0)
    settings = NodeSettings(
        state_dir=tmp_path,
        host="127.0.0.1",
        port=0,
        limits=NodeLimits(control_clients=4),
    )
    with trio.fail_after(30):
        async with PolykeyNode(settings):
            clients = open_idle(tmp_path / CONTROL_SOCKET, 10)
            assert len(clients) == 10
            times = await close_times(clients)
            # Six closed as soon as accepted, four when their time was up.
            assert all(t < 0.5 for t in times[:6]), times
            assert all(0.8 < t < 3 for t in times[6:]), times
            # A closed client's slot is free a few task switches later.
            await trio.sleep(0.2)
            status = await node_status(tmp_path)
            assert status["control"] == {
                "clients": 1,  # this call
                "accepted": 11,
                "refusedBusy": 6,
                "acceptErrors": 0,
                "timeouts": 4,
                "bugs": 0,
            }


# Runs a node with its descriptors nearly all in use: the soft limit is set
# to what the running node has open plus HEADROOM.
_NODE_SCRIPT = textwrap.dedent(
    """
    import logging, os, resource, sys
    from pathlib import Path
    import trio
    import polykey._control as control
    from polykey.agent import NodeLimits, NodeSettings, PolykeyNode

    HEADROOM = 8
    control.REQUEST_TIMEOUT = 1.5
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main():
        settings = NodeSettings(
            state_dir=Path(sys.argv[1]),
            host="127.0.0.1",
            port=0,
            # So the descriptor limit is met first.
            limits=NodeLimits(control_clients=1000),
        )
        async with PolykeyNode(settings):
            in_use = len(os.listdir("/proc/self/fd"))
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + HEADROOM, hard))
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_out_of_file_descriptors_the_node_keeps_serving(tmp_path: Path) -> None:
    # Before: accept() raising EMFILE ended the whole node (at the 37th idle
    # client with a limit of 48).
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _NODE_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stderr = bytearray()

    async def read_stderr() -> None:
        assert process.stderr is not None
        while data := await process.stderr.receive_some():
            stderr.extend(data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            with trio.fail_after(30):
                out = b""
                while not out.endswith(b"\n"):
                    chunk = await process.stdout.receive_some()
                    assert chunk, bytes(stderr).decode()
                    out += chunk
                assert out == b"ready\n"
                clients = open_idle(tmp_path / CONTROL_SOCKET, 40)
                # More than the headroom: accept() runs out of descriptors.
                assert len(clients) > 8
                times = await close_times(clients)
                await trio.sleep(0.2)
                assert process.poll() is None, bytes(stderr).decode()
                # Each was closed when its time was up, in waves as
                # descriptors came free; none waited for ever.
                assert times[0] > 1.0, times
                status = await node_status(tmp_path)
            assert status["control"]["acceptErrors"] > 0
            assert status["control"]["timeouts"] == len(clients)
            assert status["control"]["refusedBusy"] == 0
            assert "control socket: cannot accept a client" in stderr.decode()
            assert "WARNING" in stderr.decode()
            assert os.strerror(errno.EMFILE) in stderr.decode()  # the reason
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        with trio.move_on_after(10):
            await process.wait()


async def test_ping_says_how_it_connected_and_whether_it_was_pooled(
    tmp_path: Path,
) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    async with (
        PolykeyNode(NodeSettings(state_dir=a_dir, host="127.0.0.1", port=0)) as a,
        PolykeyNode(NodeSettings(state_dir=b_dir, host="127.0.0.1", port=0)) as b,
    ):
        with trio.fail_after(30):
            # A learns B's address from a first connection, then closes it.
            first = await a.connect(b.node_id, b.address)
            while a.graph.get(b.node_id) is None:  # noqa: ASYNC110 - the graph has no event
                await trio.sleep(0.01)
            await first.connection.aclose()
            assert a.connections.get(b.node_id) is None

            def ping() -> Any:
                return control_client(a_dir).unary(
                    "nodesPingNode", {"nodeIdEncoded": str(b.node_id)}
                )

            fresh = await ping()
            again = await ping()
    assert fresh["success"], fresh
    assert fresh["path"] == "direct"
    assert fresh["pooled"] is False
    # The dial began after the request; the ping came after the connection.
    assert 0 <= fresh["attemptMs"] <= fresh["connectMs"] <= fresh["rttMs"]
    assert again["success"], again
    assert again["pooled"] is True
    assert "attemptMs" not in again  # that connection was not made by this call
    assert 0 <= again["connectMs"] <= again["rttMs"]


async def test_a_bug_in_one_control_call_leaves_the_socket_serving(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug of ours in one control client's call (past the handler: in the
    call's own running) fails that call alone: logged at WARNING naming the
    control client, counted, and the next client is served."""
    from polykey.rpc import _server as rpc_server

    run = rpc_server._ServerCall.run
    broken: list[bool] = []

    async def fails_once(self: Any) -> None:
        if not broken:
            broken.append(True)
            await trio.lowlevel.checkpoint()
            raise KeyError("lost track")
        await run(self)

    settings = NodeSettings(state_dir=tmp_path, host="127.0.0.1", port=0)
    with trio.fail_after(30):
        async with PolykeyNode(settings):
            monkeypatch.setattr(rpc_server._ServerCall, "run", fails_once)
            with pytest.raises(Exception):  # noqa: B017, PT011 (whatever the client makes of it)
                await node_status(tmp_path)
            status = await node_status(tmp_path)
    assert broken == [True]
    assert status["control"]["bugs"] == 1
    assert status["control"]["clients"] == 1  # this call's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("control" in w for w in warnings), warnings
