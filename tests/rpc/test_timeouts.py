"""Every timeout rule of docs/rpc.md "Timeouts" (js-rpc's), under an autojump clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing

from polykey.rpc import (
    Handler,
    JSONStreamDecoder,
    RPCRemoteError,
    RPCRemoteTimedOut,
    RPCStreamReset,
    RPCTimedOut,
    memory_stream_pair,
)
from polykey.rpc._middleware import metadata_timeout_ms

from .helpers import Sleep, SlowRaw, default_manifest, harness


def manifest_with(sleep: Sleep) -> dict[str, Handler[Any, Any]]:
    m = default_manifest()
    m["sleep"] = sleep
    return m


async def test_client_shorter_than_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep()
    with trio.fail_after(60):
        async with harness(manifest_with(sleep), timeout=10) as h:
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                await h.client.methods.sleep({"s": 5}, rpc_timeout=2)
            assert trio.current_time() - start == pytest.approx(2)
            await h.settle()
            assert sleep.cancelled == 1
            assert sleep.finished == 0
            # The server saw the client's 2 s, not its own 10 s.
            assert sleep.seen_timeout == [pytest.approx(2)]


async def test_server_shorter_than_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep()
    with trio.fail_after(60):
        async with harness(manifest_with(sleep), timeout=1) as h:
            start = trio.current_time()
            with pytest.raises(RPCRemoteTimedOut) as info:
                await h.client.methods.sleep({"s": 5}, rpc_timeout=10)
            assert trio.current_time() - start == pytest.approx(1)
            # A remote timeout is both a timeout and a remote error.
            assert isinstance(info.value, RPCTimedOut)
            assert isinstance(info.value, RPCRemoteError)
            assert info.value.remote_type == "ErrorRPCTimedOut"
            assert isinstance(info.value.error, RPCTimedOut)
            await h.settle()
            assert sleep.cancelled == 1
            assert h.server.statistics().timeouts == 1


async def test_handler_timeout_overrides_server_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    longer = Sleep(timeout=3)
    with trio.fail_after(60):
        async with harness(manifest_with(longer), timeout=1) as h:
            assert await h.client.methods.sleep({"s": 2}) == {"slept": 2}
    shorter = Sleep(timeout=0.5)
    with trio.fail_after(60):
        async with harness(manifest_with(shorter), timeout=10) as h:
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                await h.client.methods.sleep({"s": 2})
            assert trio.current_time() - start == pytest.approx(0.5)


async def test_client_shorter_than_handler_override(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep(timeout=30)
    with trio.fail_after(60):
        async with harness(manifest_with(sleep)) as h:
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                await h.client.methods.sleep({"s": 20}, rpc_timeout=4)
            assert trio.current_time() - start == pytest.approx(4)


async def test_no_timeout_anywhere(autojump_clock: trio.testing.MockClock) -> None:
    sleep = Sleep()
    with trio.fail_after(10_000):
        async with harness(manifest_with(sleep)) as h:
            # Shielded from fail_after, the call is under no deadline at all.
            with trio.CancelScope(shield=True):
                assert await h.client.methods.sleep({"s": 5000}) == {"slept": 5000}
                out = await h.client.methods.echo({})
            assert sleep.seen_timeout == [None]
            assert out["meta"]["timeout"] is None


async def test_timeout_before_header_resets_with_code_7(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(timeout=1.5) as h:
            peer, server_end = memory_stream_pair()
            await h.server.handle_stream(server_end)
            start = trio.current_time()
            with pytest.raises(RPCStreamReset) as info:
                await peer.receive_some()
            assert info.value.reset_code == 7
            assert trio.current_time() - start == pytest.approx(1.5)
            await peer.aclose()
            await h.settle()
            assert h.server.statistics().timeouts == 1
            # The server keeps serving.
            assert (await h.client.methods.echo({"x": 1}))["echo"] == {"x": 1}


async def test_proof_of_life_on_a_long_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(timeout=1) as h:
            # 20 ticks over 10 s under a 1 s server timeout and a 1 s client
            # timeout: the first tick is proof of life for both.
            async with h.client.methods.ticks(
                {"n": 20, "every": 0.5, "first": 0.5}, rpc_timeout=1
            ) as ticks:
                got = [t["tick"] async for t in ticks]
            assert got == list(range(20))


async def test_keep_deadline_over_the_whole_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness(timeout=1) as h:
            got = []
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):  # noqa: PT012
                async with h.client.methods.ticks(
                    {"n": 20, "every": 0.3, "keep": True}
                ) as ticks:
                    async for t in ticks:
                        got.append(t["tick"])
            assert trio.current_time() - start == pytest.approx(1)
            assert got == [0, 1, 2, 3]
            # and on the client side
            got.clear()
            with pytest.raises(RPCTimedOut):  # noqa: PT012
                async with h.client.methods.ticks(
                    {"n": 20, "every": 0.3}, rpc_timeout=100, keep_deadline=True
                ) as ticks:
                    async for t in ticks:
                        got.append(t["tick"])
                        if t["tick"] == 2:
                            ticks.context.shorten_timeout(0.1)
            assert got == [0, 1, 2]


async def test_caller_deadline_goes_into_metadata(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            with trio.move_on_after(3):
                out = await h.client.methods.echo({})
            assert out["meta"]["timeout"] == 3000
            with trio.move_on_after(3):
                out = await h.client.methods.echo({}, rpc_timeout=1)
            assert out["meta"]["timeout"] == 1000
            with trio.move_on_after(0.25):
                out = await h.client.methods.echo({}, rpc_timeout=1)
            assert out["meta"]["timeout"] == 250
            out = await h.client.methods.echo({}, rpc_timeout=math.inf)
            assert out["meta"]["timeout"] == 60_000  # fail_after above
            with trio.CancelScope(shield=True):
                out = await h.client.methods.echo({}, rpc_timeout=math.inf)
            assert out["meta"]["timeout"] is None


async def test_caller_deadline_expiring_cancels_the_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep()
    with trio.fail_after(60):
        async with harness(manifest_with(sleep)) as h:
            with trio.move_on_after(2) as scope:
                await h.client.methods.sleep({"s": 10})
            assert scope.cancelled_caught
            await h.settle()
            assert sleep.cancelled == 1
            # the client reset the stream with code 7
            assert h.server_ends[-1].reset_received == 7


async def test_client_default_timeout(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with harness(client_kwargs={"timeout": 2}) as h:
            out = await h.client.methods.echo({})
            assert out["meta"]["timeout"] == 2000
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                await h.client.methods.sleep({"s": 5})
            assert trio.current_time() - start == pytest.approx(2)


async def test_timeouts_on_every_call_type(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Client-streaming and duplex calls time out while the input runs."""
    with trio.fail_after(60):
        async with harness(timeout=1) as h:
            with pytest.raises(RPCTimedOut):  # noqa: PT012
                async with h.client.methods.sum() as call:
                    await call.send({"x": 1})
                    await trio.sleep(5)
                    await call.finish()
            # The server times out waiting for a duplex call's first message;
            # the client learns it at its next operation.
            with pytest.raises(RPCTimedOut):  # noqa: PT012
                async with h.client.methods.chat() as call:
                    await trio.sleep(5)
                    await call.send({"x": 1})
            assert h.server_ends[-1].closed

    # Raw calls: the timeout holds until the server's leading response.
    manifest = default_manifest()
    manifest["slowRaw"] = SlowRaw()
    with trio.fail_after(60):
        async with harness(manifest, timeout=5) as h:
            start = trio.current_time()
            with pytest.raises(RPCTimedOut):
                async with h.client.raw("slowRaw", {"delay": 3}, rpc_timeout=1):
                    pass
            assert trio.current_time() - start == pytest.approx(1)
            with pytest.raises(RPCTimedOut):
                async with h.client.raw("slowRaw", {"delay": 10}):
                    pass
            assert trio.current_time() - start == pytest.approx(6)
            async with h.client.raw("slowRaw", {"delay": 2}) as call:
                assert call.header == {"ok": True}
                await trio.sleep(10)  # proof of life: no more timeout
                assert await call.stream.receive_some() == b"late"


@pytest.mark.parametrize(
    ("literal", "seen"),
    [
        # Past a double's range: JSON.parse reads both as Infinity.
        (b"1" + b"0" * 400, None),
        (b"1e400", None),
        # Huge but finite: effectively no client timeout either.
        (b"1" + b"0" * 300, 1e297),
    ],
)
async def test_huge_metadata_timeout_is_infinite(
    autojump_clock: trio.testing.MockClock, literal: bytes, seen: float | None
) -> None:
    sleep = Sleep()
    header = (
        b'{"jsonrpc":"2.0","method":"sleep","params":{"s":5,"metadata":{"timeout":'
        + literal
        + b'}},"id":null}'
    )
    for server_timeout in (None, 10):
        with trio.fail_after(60):
            async with harness(manifest_with(sleep), timeout=server_timeout) as h:
                peer, server_end = memory_stream_pair()
                await h.server.handle_stream(server_end)
                await peer.send_all(header)
                await peer.send_eof()
                decoder = JSONStreamDecoder()
                values: list[object] = []
                while data := await peer.receive_some():
                    values.extend(decoder.feed(data))
                await peer.aclose()
                assert values == [
                    {"jsonrpc": "2.0", "result": {"slept": 5}, "id": None}
                ]
        expected = seen if server_timeout is None else server_timeout
        assert sleep.seen_timeout.pop() == pytest.approx(expected)


def test_metadata_timeout_ms_reads_what_json_parse_would() -> None:
    def read(value: object) -> float | bool | None:
        return metadata_timeout_ms({"metadata": {"timeout": value}})

    assert read(1500) == 1500.0
    assert read(10**400) is None
    assert read(math.inf) is None
    assert read(-(10**400)) is False
    assert read(math.nan) is False
    assert read(True) is False
    assert read("5") is False
