"""Server lifecycle, middleware, concurrency and errors end to end."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from polykey.rpc import (
    CallContext,
    Middleware,
    Request,
    RPCClient,
    RPCRemoteError,
    RPCServer,
    RPCStreamReset,
    StreamAbort,
    UnaryHandler,
    memory_stream_pair,
)

from .helpers import API, Sleep, default_manifest, harness


async def test_handler_error_becomes_remote_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            with pytest.raises(RPCRemoteError) as info:
                await h.client.methods.fail({})
            exc = info.value
            assert exc.remote_type == "ValueError"
            assert exc.remote_message == "boom in <path>"
            assert isinstance(exc.error, ValueError)
            assert exc.method == "fail"
            assert "ValueError" in str(exc)


async def test_error_in_the_middle_of_a_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Breaks(default_manifest()["count"].__class__):  # type: ignore[misc]
        async def handle(self, params: Any, ctx: Any) -> Any:
            yield {"i": 0}
            raise KeyError("gone")

    manifest = default_manifest()
    manifest["count"] = Breaks()
    with trio.fail_after(60):
        async with harness(manifest) as h:
            got = []
            with pytest.raises(RPCRemoteError) as info:  # noqa: PT012
                async with h.client.methods.count({"n": 3}) as results:
                    async for r in results:
                        got.append(r)
            assert got == [{"i": 0}]
            assert isinstance(info.value.error, KeyError)


async def test_many_concurrent_calls(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            results: list[Any] = []

            async def one(i: int) -> None:
                results.append((await h.client.methods.echo({"i": i}))["echo"]["i"])

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
            assert sorted(results) == list(range(100))
            assert h.server.statistics().calls == 100


async def test_graceful_aclose_finishes_in_flight_and_refuses_new(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep()
    manifest = default_manifest()
    manifest["sleep"] = sleep
    with trio.fail_after(60):
        async with harness(manifest) as h:
            results: list[Any] = []

            async def in_flight() -> None:
                results.append(await h.client.methods.sleep({"s": 3}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await trio.sleep(1)
                with trio.move_on_after(10):
                    async with trio.open_nursery() as closing:
                        closing.start_soon(h.server.aclose)
                        await trio.sleep(0.5)
                        # refused: a new call is reset at once
                        with pytest.raises(RPCStreamReset):
                            await h.client.methods.echo({})
            assert results == [{"slept": 3}]
            assert h.server.statistics().refused == 1


async def test_aclose_past_its_deadline_cancels_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleep = Sleep()
    manifest = default_manifest()
    manifest["sleep"] = sleep
    with trio.fail_after(60):
        async with harness(manifest) as h:
            async with trio.open_nursery() as nursery:

                async def in_flight() -> None:
                    with pytest.raises(RPCStreamReset) as info:
                        await h.client.methods.sleep({"s": 100})
                    assert info.value.reset_code == 0

                nursery.start_soon(in_flight)
                await trio.sleep(1)
                start = trio.current_time()
                with trio.move_on_after(2):
                    await h.server.aclose()
                assert trio.current_time() - start == pytest.approx(2)
            assert sleep.cancelled == 1


async def test_run_with_nursery_start(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(RPCServer(default_manifest()).run)

            async def connect() -> Any:
                a, b = memory_stream_pair()
                await server.handle_stream(b)
                return a

            client = RPCClient(API, connect)
            assert (await client.methods.echo({"x": 1}))["echo"] == {"x": 1}
            await server.aclose()


async def test_serve_stream_inline(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with (
            RPCServer(default_manifest()) as server,
            trio.open_nursery() as nursery,
        ):

            async def connect() -> Any:
                a, b = memory_stream_pair()
                nursery.start_soon(server.serve_stream, b)
                return a

            client: RPCClient[API] = RPCClient(API, connect)
            async with client.methods.count({"n": 2}) as results:
                assert [r async for r in results] == [{"i": 0}, {"i": 1}]


async def test_a_stream_callback_serves_each_stream_it_is_handed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``stream_callback`` serves streams handed over by a transport's own
    step (a QUIC connection's ``deliver_streams_to``), with the transport
    metadata and connection given; a server not running resets them."""
    seen: list[Any] = []

    class Who(UnaryHandler[dict[str, Any], dict[str, Any]]):
        async def handle(self, params: dict[str, Any], ctx: CallContext) -> Any:
            seen.append(ctx.transport["node_id"])
            return {}

    manifest = {**default_manifest(), "who": Who()}
    server = RPCServer(manifest, max_calls_per_connection=1)
    callback = server.stream_callback({"node_id": "n1"}, connection="c1")
    with trio.fail_after(60):
        a, b = memory_stream_pair()
        callback(b)  # not running yet: refused
        with pytest.raises(RPCStreamReset) as refused:
            await a.receive_some()
        assert refused.value.reset_code == 0
        async with server:

            async def connect() -> Any:
                a, b = memory_stream_pair()
                callback(b)
                return a

            client: RPCClient[API] = RPCClient(API, connect)
            assert await client.unary("who", {}) == {}
            assert (await client.methods.echo({"x": 1}))["echo"] == {"x": 1}
            # connection= counts the calls: one at a time per "c1".
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.methods.sleep, {"s": 1})
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(RPCStreamReset) as busy:
                    await client.methods.echo({"x": 2})
                assert busy.value.reset_code == 1
        assert seen == ["n1"]
        stats = server.statistics()
        assert (stats.refused, stats.refused_busy_connection) == (1, 1)


class Auth(Middleware):
    """Server middleware: refuse calls without the right token."""

    async def forward(self, message: Request) -> Request:
        if self.ctx.metadata.get("token") != "sesame":
            raise PermissionError("bad token")
        return message


class AddToken(Middleware):
    """Client middleware: put the token in every first message."""

    first = True

    async def forward(self, message: Request) -> Request:
        if self.first:
            self.first = False
            params = dict(message.params or {})
            params["metadata"] = {**params.get("metadata", {}), "token": "sesame"}
            return Request(message.method, params, message.id)
        return message


async def test_middleware_auth(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with harness(middleware=[Auth]) as h:
            with pytest.raises(RPCRemoteError) as info:
                await h.client.methods.echo({})
            assert isinstance(info.value.error, PermissionError)
            good: RPCClient[API] = RPCClient(API, h.connect, middleware=[AddToken])
            out = await good.methods.echo({"a": 1})
            assert out["meta"]["token"] == "sesame"
            assert out["meta"]["timeout"] == 60_000  # timeout middleware still ran
            async with good.methods.sum() as call:
                await call.send({"x": 2})
                await call.send({"x": 3})
            assert call.result == {"sum": 5}


async def test_client_cancelled_mid_call_resets_with_a_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    async with h.client.methods.chat() as c:
                        await c.send({"x": 1})
                        await trio.sleep_forever()

                nursery.start_soon(call)
                await trio.sleep(1)
                nursery.cancel_scope.cancel()
            await h.settle()
            assert h.server_ends[-1].reset_received == 0


async def test_breaking_out_of_a_server_stream_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with harness() as h:
            async with h.client.methods.ticks({"n": 1000, "every": 1}) as ticks:
                async for t in ticks:
                    if t["tick"] == 2:
                        break
            await h.settle()
            # Our FIN went long ago; the server's sending half was stopped.
            assert h.server_ends[-1].stop_received == 0
            assert (await h.client.methods.echo({}))["echo"] == {}


async def test_stream_reset_error_carries_code() -> None:
    exc = RPCStreamReset(4)
    assert isinstance(exc, trio.BrokenResourceError)
    assert isinstance(exc, StreamAbort)
    assert exc.reset_code == 4
    assert exc.reset
    assert "reset by peer" in str(exc)
    stopped = RPCStreamReset(4, reset=False)
    assert not stopped.reset
    assert "stopped by peer" in str(stopped)


def test_a_quic_stop_sending_reaches_the_caller_as_stopped_not_reset() -> None:
    from polykey.quic import QUICStreamError
    from polykey.rpc._client import transport_error

    stopped = transport_error(QUICStreamError(0, 3, reset=False))
    assert isinstance(stopped, RPCStreamReset)
    assert (stopped.reset_code, stopped.reset) == (3, False)
    assert "stopped by peer" in str(stopped)
    reset = transport_error(QUICStreamError(0, 3, reset=True))
    assert isinstance(reset, RPCStreamReset)
    assert reset.reset
    # A stream broken without a code is not an abort.
    assert not isinstance(transport_error(trio.BrokenResourceError()), RPCStreamReset)
