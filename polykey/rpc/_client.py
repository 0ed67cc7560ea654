"""RPCClient: one stream per call, calls bounded by trio deadlines.

Theory of operation
-------------------
A call opens a stream from the factory inside its own cancel scope, the
*call scope*, whose deadline is the call's RPC timeout: the explicit
``rpc_timeout`` or else the client's default.  The timeout written to the
peer in ``params.metadata.timeout`` is the effective trio deadline at the
moment the first message leaves, so it is the smaller of the RPC timeout and
any deadline the caller is already under (``null`` when both are infinite).
The first response lifts the call scope's deadline ("proof of life"); the
caller's own scopes of course still apply.

The client runs no background task: the caller's task reads and writes.
Unary calls are plain awaits; streaming calls are async context managers
whose block runs inside the call scope, so a timeout cancels the block,
resets the stream with code 7 and raises :class:`RPCTimedOut`.  Any other
way out of the block that leaves the call unfinished (an exception, a
cancellation, breaking out of a stream early) resets the stream too, with
the code matching the reason; a call whose response has fully arrived is
closed gracefully (FIN both ways).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar

import trio

from ._codec import DEFAULT_MAX_MESSAGE_SIZE
from ._conn import EOF, MessageConn
from ._context import CallContext
from ._errors import (
    DEFAULT_ERROR_REGISTRY,
    ErrorRegistry,
    RPCError,
    RPCMissingResponse,
    RPCStreamEnded,
    RPCStreamReset,
    RPCTimedOut,
    StreamCode,
    code_for_exception,
    error_from_wire,
)
from ._messages import (
    NOT_PLAIN,
    ErrorResponse,
    JSONValue,
    Request,
    parse_response,
    plain_result,
)
from ._middleware import (
    ClientTimeoutMiddleware,
    Middleware,
    MiddlewareFactory,
    build_chain,
    forward_hooks,
    reverse_hooks,
)
from ._raw import RawStream
from ._state import ClientCallState, ClientEnd, ClientEvent, Incoming, Outgoing
from ._stream import abort_of, eager, nowait_opener, reset_stream

__all__ = [
    "ClientStreamCall",
    "DuplexCall",
    "RPCClient",
    "RawClientCall",
    "ServerStreamCall",
    "StreamFactory",
]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

# Read once: an Enum member read off its class costs 0.2 us (CPython 3.11).
_CLOSED: Final = Outgoing.CLOSED
# A drain in the call scope opens none of its own.
_NO_SCOPE: Final = contextlib.nullcontext()

StreamFactory: TypeAlias = Callable[[], Awaitable[trio.abc.HalfCloseableStream]]
_Kind: TypeAlias = Literal["UNARY", "SERVER", "CLIENT", "DUPLEX", "RAW"]


def transport_error(exc: BaseException) -> RPCError:
    """The RPC error for a transport failure seen by a caller."""
    abort = abort_of(exc)
    if abort is None:
        return RPCStreamEnded(f"stream broken: {exc}")
    if abort.reset_code == StreamCode.TIMED_OUT:
        what = "reset" if abort.reset else "stopped"
        return RPCTimedOut(f"stream {what} by peer: timed out")
    return RPCStreamReset(abort.reset_code, reset=abort.reset)


class _Call:
    """The state of one client call (shared by every call type)."""

    def __init__(
        self,
        client: RPCClient[Any],
        method: str,
        kind: _Kind,
        rpc_timeout: float | None,
        metadata: Mapping[str, JSONValue] | None,
        keep_deadline: bool,
    ) -> None:
        self.client = client
        self.method = method
        self.kind = kind
        timeout = client.timeout if rpc_timeout is None else rpc_timeout
        if timeout < 0:
            raise ValueError("rpc_timeout must be >= 0")
        # The deadline the caller is under (-inf if already cancelled: then a
        # cancellation is not a timeout).
        caller = trio.current_effective_deadline()
        self.caller_deadline = caller if math.isfinite(caller) else math.inf
        scope = trio.CancelScope(
            deadline=trio.current_time() + timeout
            if math.isfinite(timeout)
            else math.inf
        )
        self.ctx = CallContext(
            method,
            "client",
            scope,
            dict(metadata or {}),
            caller_deadline=self.caller_deadline,
        )
        if keep_deadline:
            self.ctx.keep_deadline()
        self.chain: list[Middleware] = (
            [] if kind == "RAW" else build_chain(self.ctx, client._middleware)
        )
        self.forward = forward_hooks(self.chain)
        self.reverse = reverse_hooks(self.chain)
        self.stream: trio.abc.HalfCloseableStream | None = None
        self.conn: MessageConn | None = None
        self.state = ClientCallState()
        # Messages sent: the first carries the metadata, the second is paced.
        self.sent = 0
        # The call scope's deadline set by drain(in_call_scope=True), if it
        # set one.
        self.linger_deadline: float | None = None

    async def open(self) -> None:
        stream = None
        open_nowait = self.client._open_nowait
        if open_nowait is not None and self.kind == "UNARY":
            # A unary call waits for its answer right after: opening needs
            # no schedule point of its own (one scheduling round less per
            # call), only a pending cancellation honoured first.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                stream = open_nowait()
            except trio.WouldBlock:
                pass
        if stream is None:
            stream = await self.client._stream_factory()
        self.stream = stream
        self.conn = MessageConn(stream, self.client.max_message_size)

    # -- sending -------------------------------------------------------------
    async def send(
        self, params: JSONValue, *, last: bool = False, eager: bool = False
    ) -> None:
        """Send ``params``; ``last`` ends the input with it (one packet);
        ``eager``: in the step that opened the stream (MessageConn.send)."""
        assert self.conn is not None
        if self.state.outgoing is _CLOSED:
            raise trio.ClosedResourceError("the call's input is already closed")
        if self.sent == 0 and self.ctx.metadata:
            params = _with_metadata(params, self.ctx.metadata)
        request = Request(self.method, params)
        for hook in self.forward:
            request = await hook(request)
        if self.sent == 1 and self.client.pace:
            # js-rpc 0.5.1 servers drop messages that share a read with the
            # header; give the header a read of its own.
            await trio.sleep(self.client.pace)
        if last:
            self.state.handle(ClientEvent.SEND_EOF)
        try:
            await self.conn.send(request.to_wire(), last=last, eager=eager)
        except trio.BrokenResourceError as exc:
            raise await self._explain_send_failure(exc) from None
        self.sent += 1

    async def send_eof(self) -> None:
        assert self.stream is not None
        if self.state.outgoing is Outgoing.CLOSED:
            return
        self.state.handle(ClientEvent.SEND_EOF)
        try:
            await self.stream.send_eof()
        except trio.BrokenResourceError as exc:
            raise await self._explain_send_failure(exc) from None

    async def _explain_send_failure(self, exc: BaseException) -> BaseException:
        # The server stops reading when it answers early (an error): its
        # answer is the better explanation, and it is usually here already.
        if not self.state.answered:
            with trio.move_on_after(self.client.linger):
                try:
                    await self.receive()
                except RPCError as answer:
                    return answer
                except trio.BrokenResourceError:
                    pass
        return transport_error(exc)

    # -- receiving -------------------------------------------------------------
    async def receive(self) -> Any:
        """The next result, or EOF; an error response raises."""
        assert self.conn is not None
        if self.state.answered:
            return EOF
        try:
            value = await self.conn.receive()
        except trio.BrokenResourceError as exc:
            raise transport_error(exc) from None
        if value is EOF:
            self.state.handle(ClientEvent.FIN_RECEIVED)
            return EOF
        if not self.reverse:
            result = plain_result(value)
            if result is not NOT_PLAIN:
                self.ctx.proof_of_life()
                return result
        message = parse_response(value)
        for hook in self.reverse:
            message = await hook(message)
        self.ctx.proof_of_life()
        if isinstance(message, ErrorResponse):
            self.state.handle(ClientEvent.ERROR_RESPONSE)
            err = message.error
            raise error_from_wire(
                {"code": err.code, "message": err.message, "data": err.data},
                self.client.errors,
                method=self.method,
                peer=self.client.peer,
            )
        return message.result

    async def receive_one(self) -> Any:
        value = await self.receive()
        if value is EOF:
            raise RPCMissingResponse(f"{self.method!r}: stream ended before a response")
        return value

    async def drain(self, *, in_call_scope: bool = False) -> None:
        """Read (and drop) results until the server's FIN, up to ``linger``.

        ``in_call_scope``: no scope of its own (unary calls are the hot
        path); the call scope's deadline (lifted by proof of life, unless
        kept) is brought down to ``linger`` from now instead, and if that is
        what expires, :meth:`lingered` says so and the call ends as a drain
        out of time would have left it. The server's ``_drain`` has the same
        two ways.
        """
        linger = self.client.linger
        if in_call_scope:
            self.state.handle(ClientEvent.LINGER)
            assert self.conn is not None
            if not self.conn.eof:
                # A read may wait: bound it. (With the FIN read, as over QUIC
                # when it came with the answer, nothing waits, and a deadline
                # set and cleared would cost more than the rest of the drain.)
                scope = self.ctx.cancel_scope
                deadline = trio.current_time() + linger
                if deadline < scope.deadline:
                    scope.deadline = self.linger_deadline = deadline
        with _NO_SCOPE if in_call_scope else trio.move_on_after(linger):
            while await self.receive() is not EOF:
                pass

    def lingered(self) -> bool:
        """True if the call scope was cancelled by the deadline
        :meth:`drain` set in it."""
        deadline = self.linger_deadline
        return (
            deadline is not None
            and self.ctx.cancel_scope.deadline == deadline
            and trio.current_time() >= deadline
        )

    # -- ending ----------------------------------------------------------------
    async def close(self) -> None:
        """End a call left normally (the caller's block or call is done)."""
        if self.stream is not None:
            await self._end(*self.state.end())

    async def abort(self, exc: BaseException) -> None:
        """End a call left by ``exc``."""
        if self.stream is None:
            return
        if isinstance(exc, trio.Cancelled):
            # A deadline (ours or the caller's) rather than a plain cancel?
            now = trio.current_time()
            how = self.state.end(
                cancelled=True,
                lingered=self.lingered(),
                expired=now >= min(self.ctx.deadline, self.caller_deadline),
                caller_expired=now >= self.caller_deadline,
            )
        else:
            how = self.state.end(error_code=code_for_exception(exc))
        await self._end(*how)

    async def _end(self, how: ClientEnd, code: int | None) -> None:
        assert self.stream is not None
        if how is ClientEnd.RESET:
            assert code is not None
            await reset_stream(self.stream, code)
            return
        closing = eager(self.stream)
        if closing is not None and self.state.incoming is Incoming.ENDED:
            # The server's FIN is read: a graceful close sends ours if it has
            # not gone, and waits for nothing. Done without a checkpoint of
            # its own (the call waited for its answer): a unary call over
            # QUIC ends two scheduling rounds sooner (docs/quic.md). Other
            # streams end as below, by send_eof and aclose, to the same end
            # (tests/rpc/test_over_quic.py holds the two together).
            if self.state.outgoing is Outgoing.OPEN:
                self.state.handle(ClientEvent.SEND_EOF)
            closing.close()
            return
        try:
            await self.send_eof()
        except (RPCError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        else:
            if self.state.graceful:
                # FIN both ways: nothing left for a forceful close to abort.
                await self.stream.aclose()
                return
        await trio.aclose_forcefully(self.stream)


def _cancelled_error(scope: trio.CancelScope, method: str) -> RPCError:
    """The call scope caught a cancellation: its deadline, or a cancel."""
    if trio.current_time() >= scope.deadline:
        return RPCTimedOut(f"call to {method!r} timed out")
    return RPCStreamEnded(f"call to {method!r} was cancelled")


class _CallBlock:
    """``async with`` one call: the call scope around opening the stream,
    the caller's block, and the call's end (close, or abort on the way out
    of an exception).  Every call type goes through it.

    A class rather than an ``@asynccontextmanager``: unary calls are the hot
    path, and an async generator costs trio's asyncgen hooks on every call.
    """

    __slots__ = ("_call",)

    def __init__(self, call: _Call) -> None:
        self._call = call

    async def __aenter__(self) -> _Call:
        call = self._call
        scope = call.ctx.cancel_scope
        scope.__enter__()
        try:
            await call.open()
        except BaseException as exc:
            if scope.__exit__(type(exc), exc, exc.__traceback__):
                raise _cancelled_error(scope, call.method) from None
            raise
        return call

    async def __aexit__(
        self,
        etype: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        call = self._call
        scope = call.ctx.cancel_scope
        try:
            if exc is None:
                await call.close()
            else:
                await call.abort(exc)
        except BaseException as failure:
            # Ending it raised (a cancellation, usually): the scope decides.
            if not scope.__exit__(type(failure), failure, failure.__traceback__):
                raise
        else:
            if not scope.__exit__(etype, exc, tb):
                return False  # ``exc`` goes on
        if scope.cancelled_caught and not call.lingered():
            raise _cancelled_error(scope, call.method) from None
        return True


def _with_metadata(params: JSONValue, metadata: Mapping[str, JSONValue]) -> JSONValue:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return params
    meta = params.get("metadata")
    merged = dict(metadata)
    if isinstance(meta, dict):
        merged.update(meta)
    return {**params, "metadata": merged}


class ServerStreamCall(Generic[OutT]):
    """Results of a server-streaming call: ``async for`` or :meth:`receive`."""

    def __init__(self, call: _Call) -> None:
        self._call = call

    @property
    def context(self) -> CallContext:
        return self._call.ctx

    async def receive(self) -> OutT:
        """The next result; raises :class:`trio.EndOfChannel` at the end."""
        value = await self._call.receive()
        if value is EOF:
            raise trio.EndOfChannel
        return value  # type: ignore[no-any-return]

    def __aiter__(self) -> ServerStreamCall[OutT]:
        return self

    async def __anext__(self) -> OutT:
        value = await self._call.receive()
        if value is EOF:
            raise StopAsyncIteration
        return value  # type: ignore[no-any-return]


class DuplexCall(ServerStreamCall[OutT], Generic[InT, OutT]):
    """Both ways: :meth:`send`, :meth:`send_eof`, and iterate the results."""

    async def send(self, params: InT) -> None:
        await self._call.send(params)

    async def send_eof(self) -> None:
        """Half-close: tell the server there is no more input."""
        await self._call.send_eof()

    def __aiter__(self) -> DuplexCall[InT, OutT]:
        return self


class ClientStreamCall(Generic[InT, OutT]):
    """Send params with :meth:`send`, then :meth:`finish` for the result.

    Leaving the block without calling :meth:`finish` finishes the call (and
    raises what it raises); the result is then in :attr:`result`.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._finished = False
        self.result: OutT | None = None

    @property
    def context(self) -> CallContext:
        return self._call.ctx

    async def send(self, params: InT) -> None:
        await self._call.send(params)

    async def finish(self) -> OutT:
        """Close the input and wait for the single response."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        self._finished = True
        await self._call.send_eof()
        result: OutT = await self._call.receive_one()
        await self._call.drain()
        self.result = result
        return result


class RawClientCall:
    """A raw call after the server's leading response.

    ``header`` is that response's result; ``stream`` carries raw bytes both
    ways (``send_eof`` to half-close, ``receive_some`` until ``b""``).
    """

    def __init__(self, header: JSONValue, stream: RawStream, ctx: CallContext) -> None:
        self.header = header
        self.stream = stream
        self.context = ctx


ManifestT = TypeVar("ManifestT")


class RPCClient(Generic[ManifestT]):
    """Makes calls, one stream from ``stream_factory`` per call.

    ``manifest`` is a :class:`~polykey.rpc.ClientManifest` subclass declaring
    the callers; an instance bound to this client is :attr:`methods`.  The
    generic methods (:meth:`unary`, :meth:`server_stream`, ...) take a method
    name and work without a manifest.

    ``timeout`` is the default RPC timeout in seconds (``math.inf``, the
    default, for none); ``pace`` inserts a pause after the first message of a
    streaming call, a work-around for js-rpc 0.5.1 servers; ``linger``
    bounds the wait for the server's FIN once a call has its answer.
    ``peer`` says who the calls go to (NodeId and address), for the log.

    When ``stream_factory`` is a bound ``open_stream`` whose object has
    ``open_stream_nowait`` (a :class:`~polykey.quic.QUICConnection`'s), a
    unary call opens its stream with that when it need not wait, and writes
    its request in the same step: the call's one schedule point is its wait
    for the answer.
    """

    def __init__(
        self,
        manifest: Callable[[RPCClient[ManifestT]], ManifestT] | None,
        stream_factory: StreamFactory,
        *,
        timeout: float = math.inf,
        middleware: Sequence[MiddlewareFactory] = (),
        timeout_middleware: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        errors: ErrorRegistry = DEFAULT_ERROR_REGISTRY,
        linger: float = 5.0,
        pace: float = 0.0,
        peer: str | None = None,
    ) -> None:
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        self.timeout = timeout
        self._stream_factory = stream_factory
        self._open_nowait = nowait_opener(stream_factory)
        factories: list[MiddlewareFactory] = []
        if timeout_middleware:
            factories.append(ClientTimeoutMiddleware)
        factories.extend(middleware)
        self._middleware = tuple(factories)
        self.max_message_size = max_message_size
        self.errors = errors
        self.linger = linger
        self.pace = pace
        self.peer = peer
        self._manifest = manifest

    @property
    def methods(self) -> ManifestT:
        """The manifest's callers, bound to this client. Made at each access
        (one small object): a client that kept it would be in a reference
        cycle with it, and so would its stream factory's connection, left
        for the cyclic collector, which does not see quiche's memory."""
        if self._manifest is None:
            raise AttributeError("this client was made without a manifest")
        return self._manifest(self)

    def _call(
        self,
        method: str,
        kind: _Kind,
        rpc_timeout: float | None,
        metadata: Mapping[str, JSONValue] | None,
        keep_deadline: bool,
    ) -> _CallBlock:
        return _CallBlock(
            _Call(self, method, kind, rpc_timeout, metadata, keep_deadline)
        )

    # -- the five call types -------------------------------------------------------
    async def unary(
        self,
        method: str,
        params: JSONValue = None,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> Any:
        """One request, one response."""
        async with self._call(
            method, "UNARY", rpc_timeout, metadata, keep_deadline
        ) as call:
            # The FIN goes after the response, as js-rpc's caller does: until
            # then a reset can still reach a handler that waits. Opening the
            # stream was the checkpoint: the request goes in the same step.
            await call.send({} if params is None else params, eager=True)
            result = await call.receive_one()
            assert call.conn is not None
            if not call.conn.eof:
                # Ours before waiting for the server's: a server may wait
                # for it. If the server's FIN came with the answer, ours
                # goes with the close instead (one checkpoint less).
                await call.send_eof()
            await call.drain(in_call_scope=True)
        return result

    @asynccontextmanager
    async def server_stream(
        self,
        method: str,
        params: JSONValue = None,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AsyncIterator[ServerStreamCall[Any]]:
        """One request, a stream of results to iterate inside the block."""
        async with self._call(
            method, "SERVER", rpc_timeout, metadata, keep_deadline
        ) as call:
            await call.send({} if params is None else params, last=True)
            yield ServerStreamCall(call)

    @asynccontextmanager
    async def client_stream(
        self,
        method: str,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AsyncIterator[ClientStreamCall[Any, Any]]:
        """A stream of requests, one result (from ``finish()``)."""
        async with self._call(
            method, "CLIENT", rpc_timeout, metadata, keep_deadline
        ) as call:
            handle: ClientStreamCall[Any, Any] = ClientStreamCall(call)
            yield handle
            if not handle._finished:
                await handle.finish()

    @asynccontextmanager
    async def duplex(
        self,
        method: str,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AsyncIterator[DuplexCall[Any, Any]]:
        """Streams both ways inside the block."""
        async with self._call(
            method, "DUPLEX", rpc_timeout, metadata, keep_deadline
        ) as call:
            yield DuplexCall(call)

    @asynccontextmanager
    async def raw(
        self,
        method: str,
        header: JSONValue = None,
        *,
        rpc_timeout: float | None = None,
        keep_deadline: bool = False,
    ) -> AsyncIterator[RawClientCall]:
        """A JSON header, then raw bytes both ways (no middleware)."""
        async with self._call(method, "RAW", rpc_timeout, None, keep_deadline) as call:
            assert call.conn is not None
            assert call.stream is not None
            await call.send(header)
            leading = await call.receive_one()
            raw = RawStream(call.stream, call.conn.take_leftover())
            yield RawClientCall(leading, raw, call.ctx)
            # The raw stream's life is the caller's; a closed one is fine.
            call.state.handle(ClientEvent.RAW)
