"""The in-memory transport: trio's stream contract plus FIN and reset codes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from polykey.rpc import (
    MemoryStream,
    ResettableStream,
    RPCStreamReset,
    memory_stream_pair,
)


async def make_pair() -> tuple[MemoryStream, MemoryStream]:
    return memory_stream_pair()


async def test_conforms_to_half_closeable_stream() -> None:
    with trio.fail_after(30):
        # No clogged maker: an empty buffer always has room, so there is no
        # "clogged" fresh stream; flow control is tested below instead.
        await trio.testing.check_half_closeable_stream(make_pair, None)


async def test_reset_reaches_both_directions_of_the_peer() -> None:
    with trio.fail_after(5):
        a, b = memory_stream_pair()
        assert isinstance(a, ResettableStream)
        await a.send_all(b"unread data is discarded")
        a.reset(7)
        with pytest.raises(RPCStreamReset) as info:
            await b.receive_some()
        assert info.value.reset_code == 7
        assert info.value.reset  # RESET_STREAM, seen by the reader
        with pytest.raises(RPCStreamReset) as info:
            await b.send_all(b"x")
        assert info.value.reset_code == 7
        assert not info.value.reset  # STOP_SENDING, seen by the writer
        assert b.reset_received == 7
        assert b.stop_received == 7
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"x")
        a.reset(3)  # idempotent
        await b.aclose()


async def test_reset_wakes_a_blocked_peer() -> None:
    with trio.fail_after(5):
        a, b = memory_stream_pair(max_buffer=4)
        async with trio.open_nursery() as nursery:

            async def blocked_send() -> None:
                with pytest.raises(RPCStreamReset):
                    await a.send_all(b"more than four bytes")

            async def blocked_receive() -> None:
                with pytest.raises(RPCStreamReset):
                    await a.receive_some()

            nursery.start_soon(blocked_send)
            nursery.start_soon(blocked_receive)
            await trio.testing.wait_all_tasks_blocked()
            b.reset(5)


async def test_flow_control_bounds_the_buffer() -> None:
    with trio.fail_after(5):
        a, b = memory_stream_pair(max_buffer=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_all, b"x" * 100)
            await trio.testing.wait_all_tasks_blocked()
            assert len(a._out.buf) == 10
            got = b""
            while len(got) < 100:
                got += await b.receive_some()
        assert got == b"x" * 100


async def test_graceful_close_keeps_sent_data() -> None:
    with trio.fail_after(5):
        a, b = memory_stream_pair()
        await a.send_all(b"last words")
        await a.aclose()
        assert await b.receive_some() == b"last words"
        assert await b.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"nobody listens")
        assert b.stop_received == 0


async def test_nowait_reads_and_writes_take_what_needs_no_waiting() -> None:
    """As QUIC streams do (the RPC layer's EagerStream): no checkpoint,
    WouldBlock when a read would wait, the part that fits of a write."""
    a, b = memory_stream_pair(max_buffer=10)
    with trio.testing.assert_no_checkpoints():
        with pytest.raises(trio.WouldBlock):
            b.receive_nowait()
        assert a.send_nowait(b"0123456789abc", eof=True) == 10
        assert not b.fin_received
        assert b.receive_nowait(4) == b"0123"
        assert a.send_nowait(b"abc", eof=True) == 3
        assert b.receive_nowait() == b"456789abc"
        assert b.fin_received
        assert b.receive_nowait() == b""
    with pytest.raises(ValueError, match="needs data"):
        a.send_nowait(b"")
    with pytest.raises(trio.ClosedResourceError):
        a.send_nowait(b"x")

    async def reader() -> None:
        with pytest.raises(RPCStreamReset):
            await a.receive_some()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                a.receive_nowait()
            b.reset(7)
    with pytest.raises(RPCStreamReset):
        a.receive_nowait()


async def test_input_no_task_waits_for_goes_to_the_watcher() -> None:
    """As a QUIC stream calls back (watch_input): data, the FIN, a reset
    and a close each reach the watcher, in the peer's own call; a task
    reading gets the input instead; closing stops the watcher."""
    with trio.fail_after(5):
        a, b = memory_stream_pair()
        seen: list[bytes | str] = []

        def watch() -> None:
            try:
                while data := b.receive_nowait():
                    seen.append(data)
                seen.append("fin")
            except trio.WouldBlock:
                pass
            except RPCStreamReset as exc:
                seen.append(f"reset {exc.reset_code}")

        b.watch_input(watch)
        await a.send_all(b"one")
        assert seen == [b"one"]  # read within a's send_all
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await b.receive_some())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await a.send_all(b"two")
        assert got == [b"two"]
        assert seen == [b"one"]
        await a.send_eof()
        assert seen == [b"one", "fin"]

        a, b = memory_stream_pair()
        seen.clear()
        b.watch_input(watch)
        a.reset(3)
        assert seen == ["reset 3"]

        a, b = memory_stream_pair()
        seen.clear()
        b.watch_input(watch)
        b.close()
        a.close()  # the peer's FIN: nobody is told now
        assert seen == []


async def test_a_watcher_that_raises_resets_the_stream_not_the_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(5):
        a, b = memory_stream_pair()

        def broken() -> None:
            raise RuntimeError("a watcher's bug")

        b.watch_input(broken)
        await a.send_all(b"boom")  # the peer's call goes on
        assert b.closed
        with pytest.raises(RPCStreamReset) as info:
            await a.receive_some()
        assert info.value.reset_code == 0
    [record] = [r for r in caplog.records if r.name == "polykey.rpc"]
    assert "input watcher failed" in record.getMessage()
