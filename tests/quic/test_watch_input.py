"""QUICStream.watch_input: input that no task waits for goes to a callback,
run from the socket's reader (an RPC server's call whose handler waits is
watched so, instead of by a reader task)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from polykey.quic import (
    QUICConnection,
    QUICConnectionError,
    QUICStream,
    QUICStreamError,
)

from .helpers import open_pair


class Watch:
    """Reads what the stream holds each time it is called, as a watcher
    must; records what it read and what reading raised."""

    def __init__(self, stream: QUICStream) -> None:
        self.stream = stream
        self.calls = 0
        self.data = b""
        self.fin = False
        self.error: BaseException | None = None
        self.changed = trio.Event()

    def __call__(self) -> None:
        self.calls += 1
        try:
            while data := self.stream.receive_nowait():
                self.data += data
            self.fin = True
            self.stream.watch_input(None)
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
            self.stream.watch_input(None)
        self.changed.set()
        self.changed = trio.Event()


@asynccontextmanager
async def watched() -> AsyncIterator[
    tuple[QUICConnection, QUICStream, QUICStream, Watch]
]:
    """A connection, a stream's two sides, and a :class:`Watch` watching
    the server's side."""
    async with open_pair() as pair:
        client_conn, server_conn = await pair.connect()
        cs, ss = await pair.stream_pair(client_conn, server_conn)
        watch = Watch(ss)
        ss.watch_input(watch)
        yield client_conn, cs, ss, watch


async def test_data_and_the_fin_reach_the_watcher_without_a_task() -> None:
    async with watched() as (_client_conn, cs, ss, watch):
        with trio.fail_after(5):
            await cs.send_all(b"more")
            while watch.data != b"more":
                await watch.changed.wait()
            assert not watch.fin
            await cs.send_eof()
            while not watch.fin:
                await watch.changed.wait()
        assert watch.data == b"more"
        assert watch.error is None
        calls = watch.calls
        # Stopped (here by itself, at the FIN): never called again.
        await ss.send_all_and_eof(b"reply")
        assert await cs.receive_some() == b"reply"
        await trio.sleep(0.05)
        assert watch.calls == calls


@pytest.mark.parametrize("how", ["reset", "connection"])
async def test_the_peers_reset_and_the_connections_end_reach_the_watcher(
    how: str,
) -> None:
    async with watched() as (client_conn, cs, _ss, watch):
        with trio.fail_after(5):
            if how == "reset":
                cs.reset(7)
            else:
                client_conn.close(3, b"bye")
            while watch.error is None:
                await watch.changed.wait()
        if how == "reset":
            assert isinstance(watch.error, QUICStreamError)
            assert watch.error.reset_code == 7
        else:
            assert isinstance(watch.error, QUICConnectionError)


async def test_a_task_waiting_to_read_gets_the_input_not_the_watcher() -> None:
    async with watched() as (_client_conn, cs, ss, watch):
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await ss.receive_some())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                await cs.send_all(b"for the task")
        assert got == [b"for the task"]
        assert watch.calls == 0


async def test_closing_stops_the_watcher() -> None:
    async with watched() as (_client_conn, cs, ss, watch):
        ss.close_dropping_input()
        with trio.fail_after(5):
            await cs.send_all_and_eof(b"dropped")
            assert await cs.receive_some() == b""
        await trio.sleep(0.05)
        assert watch.calls == 0


async def test_a_watcher_that_raises_is_contained() -> None:
    """A bug in a watcher is logged and counted, its stream reset; the
    socket's reader, the connection and its other streams go on."""
    async with open_pair() as pair:
        client_conn, server_conn = await pair.connect()
        cs, ss = await pair.stream_pair(client_conn, server_conn)

        def broken() -> None:
            raise RuntimeError("a watcher's bug")

        ss.watch_input(broken)
        with trio.fail_after(5):
            await cs.send_all(b"boom")

            async def read_to_the_reset() -> None:
                while True:
                    await cs.receive_some()

            with pytest.raises(QUICStreamError):
                await read_to_the_reset()
            assert pair.server_socket.statistics.unexpected_errors == 1
            cs2, ss2 = await pair.stream_pair(client_conn, server_conn)
            await cs2.send_all_and_eof(b"still here")
            assert await ss2.receive_some() == b"still here"
        with pytest.raises(trio.ClosedResourceError):
            await ss.send_all(b"x")
