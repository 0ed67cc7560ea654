"""The five call types over in-memory streams, through the typed manifest."""

from __future__ import annotations

import trio
import trio.testing

from .helpers import harness


async def test_unary(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with harness() as h:
            out = await h.client.methods.echo({"a": 1}, metadata={"token": "t"})
            assert out["echo"] == {"a": 1}
            assert out["meta"]["token"] == "t"
            # The caller's deadline (fail_after above) went along.
            assert out["meta"]["timeout"] == 10_000


async def test_server_stream(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with harness() as h:
            async with h.client.methods.count({"n": 5}) as results:
                got = [r["i"] async for r in results]
            assert got == [0, 1, 2, 3, 4]


async def test_client_stream(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with harness() as h:
            async with h.client.methods.sum() as call:
                for x in range(10):
                    await call.send({"x": x})
                result = await call.finish()
            assert result == {"sum": 45}


async def test_duplex(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with harness() as h, h.client.methods.chat() as call:
            for i in range(3):
                await call.send({"n": i})
                assert await call.receive() == {"re": {"n": i}}
            await call.send_eof()
            assert [r async for r in call] == []


async def test_raw(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with harness() as h:
            async with h.client.methods.raw_echo({"x": 1}) as call:
                assert call.header == {"hello": {"x": 1}}
                await call.stream.send_all(b"hello raw")
                await call.stream.send_eof()
                got = b""
                while data := await call.stream.receive_some():
                    got += data
            assert got == b"HELLO RAW"
