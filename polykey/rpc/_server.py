"""RPCServer: serves one call per stream, each call a task in its nursery.

Theory of operation
-------------------
Every call runs in one cancel scope, the *call scope*, created when the
stream arrives with the server's default timeout as its deadline (js-rpc's
``timeoutTime``).  Waiting for the header runs in it: a peer that never
sends one is reset with code 7 when it expires.  When the header arrives
the timer restarts with the handler's own ``timeout`` if it declares one
(else the default again), and the timeout middleware then shortens it to the
client's ``params.metadata.timeout``: effective = min(handler or default,
client).  The first response message is proof of life: the deadline is
lifted then (unless the handler called ``ctx.keep_deadline()``).

The handler runs in the call's task, and a reader task (in the server's
nursery, stopped by the call before it ends) decodes the rest of the input.
For client-streaming and duplex calls the reader hands params to the handler
through an unbuffered channel (so backpressure reaches the peer); for unary
and server-streaming calls it discards extra input, as js-rpc does.  The
reader turns what it sees into actions: a reset or broken stream cancels the
call (the peer is gone); a protocol error (bad JSON, oversize message,
invalid request, invalid params) cancels the handler and is answered with
its own error code (never in the middle of a message being sent).  A unary
handler that answers without ever waiting has nothing to be cancelled, so
its reader starts only when the handler first waits; without one, the call
task reads the client's FIN itself, or over a stream that can drop it (QUIC)
leaves it to the stream.  Where the reader would feed nothing (unary and
server-streaming calls) and the stream can call back when input arrives
(QUIC's and MemoryStream's: an InputWatcher), the reader is that
callback, not a task: it reads what is there without waiting and turns it
into the same actions.  Per call that is one task, one cancel scope and
the stream operations themselves, which matters: unary calls are the hot
path.

How a call ends (decided from the call's states, see _state.py):

* handler result or error -> response(s), FIN, then wait (up to ``linger``)
  for the client's FIN so a TCP peer never sees an RST, then close; a
  stream that can drop the rest of the input as it comes (QUIC's, with no
  reader task running) is closed at once so instead;
* timeout before the header -> reset with code 7, no reply;
* timeout after the header -> ``ErrorRPCTimedOut`` response and FIN (the JS
  client waits for it; ours has its own timer), handler cancelled; a raw
  call already streaming bytes is reset with code 7;
* peer reset or vanished -> handler cancelled, stream closed;
* the handler cancelled ``ctx.cancel_scope`` -> reset with code 1;
* forced stop (``aclose`` past its deadline) -> reset with code 0.

Nothing a peer sends can raise out of a call task.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Hashable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Final

import attrs
import trio

from ._codec import DEFAULT_MAX_MESSAGE_SIZE, encode_json
from ._conn import EOF, MessageConn
from ._context import CallContext
from ._errors import (
    RPCError,
    RPCHandlerFailed,
    RPCInternalError,
    RPCInvalidParams,
    RPCMethodNotFound,
    RPCMissingResponse,
    RPCOutputStreamError,
    RPCTimedOut,
    StreamCode,
    error_to_wire,
    is_answer,
)
from ._handlers import (
    ClientHandler,
    DuplexHandler,
    Handler,
    RawCall,
    RawHandler,
    ServerHandler,
    UnaryHandler,
)
from ._messages import (
    ErrorObject,
    ErrorResponse,
    Request,
    Response,
    as_request,
    parse_request,
    result_wire,
)
from ._middleware import (
    Middleware,
    MiddlewareFactory,
    ReverseHook,
    ServerTimeoutMiddleware,
    build_chain,
    reverse_hooks,
    run_forward,
    run_reverse,
)
from ._raw import RawStream
from ._state import (
    Action,
    EndAction,
    Input,
    Output,
    ServerCallState,
    ServerEvent,
    Stop,
)
from ._stream import (
    InputWatcher,
    ResettableStream,
    dropper,
    eager,
    reset_stream,
    watcher,
)

__all__ = ["RPCServer", "ServerStatistics"]

_log = logging.getLogger("polykey.rpc")

#: How long a best-effort reply may take once the call is being torn down.
_REPLY_GRACE: Final = 1.0
#: What a bug of the server's own is answered with, where it still can be.
_INTERNAL_ERROR_REPLY: Final = {
    "jsonrpc": "2.0",
    "error": error_to_wire(RPCInternalError()),
    "id": None,
}

# The states and events of every message sent, looked up once: reading an
# Enum member off its class costs 0.2 us in CPython 3.11 (a global, 0.02).
_TORN: Final = Output.TORN
_SEND: Final = ServerEvent.SEND
_SENT: Final = ServerEvent.SENT
_SENT_LAST: Final = ServerEvent.SENT_LAST
_NO_ACTION: Final = Action.NONE
_NO_SCOPE: Final = contextlib.nullcontext()


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


@attrs.define
class ServerStatistics:
    active_calls: int = 0
    calls: int = 0
    refused: int = 0
    timeouts: int = 0
    error_responses: int = 0
    resets: int = 0
    peer_resets: int = 0
    internal_errors: int = 0
    #: Calls to a method this server does not serve.
    unknown_methods: int = 0
    #: Calls refused at once because ``max_calls`` were in flight.
    refused_busy: int = 0
    #: Calls refused at once because their connection had
    #: ``max_calls_per_connection`` in flight.
    refused_busy_connection: int = 0
    #: Handler exceptions that were bugs, not answers: -32603 on the wire,
    #: the traceback in the log (WARNING).
    handler_bugs: int = 0
    #: Calls by method (those the manifest serves; a header was read).
    calls_by_method: dict[str, int] = attrs.field(factory=dict)


class RPCServer:
    """Serves calls to the handlers of ``manifest``, one stream per call.

    Use as ``async with RPCServer(manifest) as server:`` (or
    ``await nursery.start(server.run)``) and give it streams with
    :meth:`handle_stream`.  ``timeout`` is the default call timeout in
    seconds (``None``: infinite, js-rpc's default; Polykey's agent uses 15).
    ``middleware`` factories run after the timeout middleware.  ``linger``
    bounds the wait for a client's FIN after a call has answered.
    ``close_grace`` is how long leaving the ``async with`` block lets
    in-flight calls finish.  ``max_calls`` bounds the calls in flight, and
    ``max_calls_per_connection`` those of one ``connection`` given to
    :meth:`handle_stream`: a call beyond either is refused at once, by a
    reset with code 1 where the stream can be reset (what js-rpc does for a
    method it does not serve), else by a -32000 error. A call that has
    answered and only waits (up to ``linger``) for the client's FIN no
    longer counts: it holds a stream, not a handler, and clients that
    vanish after their answer must not hold the slots of the next ones.
    """

    def __init__(
        self,
        manifest: Mapping[str, Handler[Any, Any]],
        *,
        timeout: float | None = None,
        middleware: Sequence[MiddlewareFactory] = (),
        timeout_middleware: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        linger: float = 5.0,
        close_grace: float = 5.0,
        max_calls: int | None = None,
        max_calls_per_connection: int | None = None,
    ) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        for name, limit in (
            ("max_calls", max_calls),
            ("max_calls_per_connection", max_calls_per_connection),
        ):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1 or None")
        for name, handler in manifest.items():
            if not isinstance(name, str) or not isinstance(handler, Handler):
                raise TypeError(f"manifest entry {name!r} is not a Handler")
            if not hasattr(handler, "kind"):
                raise TypeError(f"{name!r}: subclass one of the five handler types")
            if handler.timeout is not None and handler.timeout < 0:
                raise ValueError(f"{name!r}: handler timeout must be >= 0")
        self.manifest: dict[str, Handler[Any, Any]] = dict(manifest)
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.linger = linger
        self.close_grace = close_grace
        self.max_calls = max_calls
        self.max_calls_per_connection = max_calls_per_connection
        self._per_connection: collections.Counter[Hashable] = collections.Counter()
        factories: list[MiddlewareFactory] = []
        if timeout_middleware:
            factories.append(ServerTimeoutMiddleware)
        factories.extend(middleware)
        self._middleware = tuple(factories)
        self._state = _State.NEW
        # The lifecycle idiom of QUICSocket and PolykeyNode: the exit stack
        # exists from the start; __aenter__ enters the nursery through it.
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._calls: set[_ServerCall] = set()
        #: The calls that count toward the limits: not yet lingering.
        self._holding: set[_ServerCall] = set()
        self._idle = trio.Event()
        self._closed = trio.Event()
        self._stats = ServerStatistics()

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> RPCServer:
        if self._state is not _State.NEW:
            raise RuntimeError("an RPCServer can be started once")
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._state = _State.RUNNING
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            if exc is None:
                with trio.move_on_after(self.close_grace):
                    await self.aclose()
            self._force_stop()
        finally:
            self._state = _State.CLOSED
            self._closed.set()
            result = await self._stack.__aexit__(exc_type, exc, tb)
        return bool(result)

    async def run(
        self, *, task_status: trio.TaskStatus[RPCServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until :meth:`aclose`; for ``await nursery.start(server.run)``."""
        async with self:
            task_status.started(self)
            await self._closed.wait()

    async def aclose(self) -> None:
        """Refuse new calls and wait for in-flight ones to finish.

        Bound the wait with a cancel scope; when it is cancelled the calls
        left are cancelled (their streams reset) before this returns.
        """
        if self._state is _State.RUNNING:
            self._state = _State.STOPPING
        try:
            if self._calls:
                await self._idle.wait()
        finally:
            if self._calls:
                self._force_stop()
                with trio.CancelScope(shield=True):
                    await self._idle.wait()
            if self._state is _State.STOPPING:
                self._state = _State.CLOSED
            self._closed.set()

    def _force_stop(self) -> None:
        self._state = _State.CLOSED if self._state is not _State.NEW else self._state
        for call in list(self._calls):
            call.force_stop()

    def statistics(self) -> ServerStatistics:
        self._stats.active_calls = len(self._calls)
        return attrs.evolve(
            self._stats, calls_by_method=dict(self._stats.calls_by_method)
        )

    # -- serving -------------------------------------------------------------
    async def handle_stream(
        self,
        stream: trio.abc.HalfCloseableStream,
        transport_meta: Mapping[str, Any] | None = None,
        *,
        connection: Hashable | None = None,
    ) -> None:
        """Serve the call on ``stream`` as a task of this server.

        Returns at once.  A server that is stopping refuses the stream
        (reset with code 0); one past its limits refuses it with code 1.
        ``connection`` (any hashable: the transport's connection) is what
        ``max_calls_per_connection`` counts by.
        """
        if not self.handle_stream_nowait(stream, transport_meta, connection=connection):
            await reset_stream(stream, StreamCode.UNKNOWN)

    def handle_stream_nowait(
        self,
        stream: trio.abc.HalfCloseableStream,
        transport_meta: Mapping[str, Any] | None = None,
        *,
        connection: Hashable | None = None,
    ) -> bool:
        """:meth:`handle_stream` for a caller that cannot wait (a transport
        handing over streams from its reader): False when the server is not
        running, and then the caller refuses the stream (a reset with code
        0, as :meth:`handle_stream` does)."""
        if self._state is not _State.RUNNING or self._nursery is None:
            self._stats.refused += 1
            return False
        if self._busy(connection):
            self._nursery.start_soon(self._refuse_busy, stream)
            return True
        call = self._register(stream, transport_meta, connection)
        self._nursery.start_soon(self._run_call, call)
        return True

    def stream_callback(
        self,
        transport_meta: Mapping[str, Any] | None = None,
        *,
        connection: Hashable | None = None,
    ) -> Callable[[trio.abc.HalfCloseableStream], None]:
        """A callback that serves each stream it is given as a call of this
        server (:meth:`handle_stream_nowait`, with ``transport_meta`` and
        ``connection``), for a transport that hands over streams as they
        open: a QUIC connection's ``deliver_streams_to``, as a node's
        connections serve. No task waits for the streams; a stream the
        server cannot take (it is not running) is refused as
        :meth:`handle_stream` refuses it, reset with code 0 (or closed, by
        a stream that cannot reset but can close without waiting)::

            conn.deliver_streams_to(server.stream_callback(meta, connection=conn))
        """
        meta = dict(transport_meta or {})

        def serve(stream: trio.abc.HalfCloseableStream) -> None:
            if not self.handle_stream_nowait(stream, meta, connection=connection):
                if isinstance(stream, ResettableStream):
                    stream.reset(StreamCode.UNKNOWN)
                elif (closing := eager(stream)) is not None:
                    closing.close()

        return serve

    async def serve_stream(
        self,
        stream: trio.abc.HalfCloseableStream,
        transport_meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Serve the call on ``stream`` in the calling task; returns when done."""
        if self._state is not _State.RUNNING:
            self._stats.refused += 1
            await reset_stream(stream, StreamCode.UNKNOWN)
            return
        if self._busy(None):
            await self._refuse_busy(stream)
            return
        await self._run_call(self._register(stream, transport_meta))

    def _busy(self, connection: Hashable | None) -> bool:
        """Whether a new call (of ``connection``) is past a limit; counted."""
        if self.max_calls is not None and len(self._holding) >= self.max_calls:
            self._stats.refused_busy += 1
            return True
        limit = self.max_calls_per_connection
        if (
            limit is not None
            and connection is not None
            and self._per_connection[connection] >= limit
        ):
            self._stats.refused_busy_connection += 1
            return True
        return False

    async def _refuse_busy(self, stream: trio.abc.HalfCloseableStream) -> None:
        # As js-rpc refuses a method it does not serve: a reset with code 1
        # where there is one, else a JSON error (not reading the request).
        if not isinstance(stream, ResettableStream):
            wire = error_to_wire(RPCHandlerFailed("too many calls in flight"))
            reply = {"jsonrpc": "2.0", "error": wire, "id": None}
            with trio.move_on_after(_REPLY_GRACE):
                try:
                    await stream.send_all(encode_json(reply))
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await reset_stream(stream, StreamCode.HANDLER_FAILED)

    def _handler_bug(
        self,
        exc: BaseException,
        method: str,
        transport: Mapping[str, Any],
        *,
        part: str = "handler",
        outcome: str = "answered -32603",
    ) -> RPCInternalError:
        """What a handler's unexpected exception is answered with; logged
        with the peer it came from, the traceback kept off the wire. Also
        for the call's other code of the application's (``part``: its
        middleware, its input's parsing), where ``outcome`` says what the
        caller got instead."""
        self._stats.handler_bugs += 1
        _log.warning(
            "RPC %s %r failed unexpectedly (peer %s); %s",
            part,
            method[:100],
            _peer(transport),
            outcome,
            exc_info=exc,
        )
        return RPCInternalError()

    def _internal_error(
        self,
        what: str,
        transport: Mapping[str, Any],
        exc: BaseException | None = None,
        outcome: str = "stream reset",
    ) -> None:
        """A bug of the server's own, caught where a call ends: counted in
        ``internal_errors``, logged at WARNING with the peer and what the
        caller got (``outcome``)."""
        self._stats.internal_errors += 1
        _log.warning(
            "%s failed unexpectedly (peer %s); %s",
            what,
            _peer(transport),
            outcome,
            exc_info=exc if exc is not None else True,
        )

    def _register(
        self,
        stream: trio.abc.HalfCloseableStream,
        meta: Mapping[str, Any] | None,
        connection: Hashable | None = None,
    ) -> _ServerCall:
        call = _ServerCall(self, stream, dict(meta or {}), connection)
        self._calls.add(call)
        self._holding.add(call)
        if connection is not None:
            self._per_connection[connection] += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self._stats.calls += 1
        return call

    def _release(self, call: _ServerCall) -> None:
        """``call`` no longer counts toward the limits (it lingers, or ended)."""
        if call not in self._holding:
            return
        self._holding.discard(call)
        connection = call.connection
        if connection is not None:
            self._per_connection[connection] -= 1
            if self._per_connection[connection] <= 0:
                del self._per_connection[connection]

    async def _run_call(self, call: _ServerCall) -> None:
        try:
            await call.run()
        except Exception:
            # A bug, not a peer's doing (those are handled in the call), that
            # got past run()'s own catch (its close, or its -32603 reply):
            # keep serving the other calls, and say so.
            self._internal_error("RPC call", call.transport)
            await trio.aclose_forcefully(call.stream)
        finally:
            self._release(call)
            self._calls.discard(call)
            if not self._calls:
                self._idle.set()


def _peer(transport: Mapping[str, Any]) -> str:
    """Who a call came from, for the log: NodeId (or peer) and address."""
    peer = transport.get("node_id", transport.get("peer", "?"))
    host, port = transport.get("host"), transport.get("port")
    if host is None:
        return str(peer)
    return f"{peer} at {host}" + (f":{port}" if port is not None else "")


class _UnencodableReply(Exception):
    """A reply JSON cannot carry (a handler's result, an error's data): a
    bug, never an answer (-32603); the encoder's error is its cause."""


def _encode_reply(value: Any) -> bytes:
    try:
        return encode_json(value)
    except Exception as exc:
        raise _UnencodableReply(
            f"the reply cannot be encoded ({type(exc).__name__})"
        ) from exc


class _OnFirstBlock:
    """Awaits ``coro``, calling ``on_block()`` just before the first time it
    waits on trio; a coroutine that never waits costs nothing more.

    After that first wait it forwards every suspension and resumption, as
    ``await coro`` would.
    """

    __slots__ = ("_coro", "_on_block")

    def __init__(self, coro: Coroutine[Any, Any, Any], on_block: Callable[[], None]):
        self._coro = coro
        self._on_block = on_block

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            return stop.value
        self._on_block()
        while True:
            try:
                sent = yield trap
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    trap = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    trap = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class _ServerCall:
    """Drives one call's stream and handler; its state is :attr:`state`
    (see _state.py), which decides how the call ends."""

    def __init__(
        self,
        server: RPCServer,
        stream: trio.abc.HalfCloseableStream,
        transport: dict[str, Any],
        connection: Hashable | None = None,
    ) -> None:
        self.server = server
        self.stream = stream
        self.transport = transport
        #: What ``max_calls_per_connection`` counts it by.
        self.connection = connection
        self.conn = MessageConn(stream, server.max_message_size)
        self.state = ServerCallState()
        # The deadline starts when the stream arrives, like js-rpc's timer.
        timeout = server.timeout
        self.scope = trio.CancelScope(
            deadline=math.inf if timeout is None else trio.current_time() + timeout
        )
        # The scope bad input cancels (see _cancel_handler); None for unary
        # handlers, which bad input cancels through the call scope instead.
        self.handler_scope: trio.CancelScope | None = None
        self.ctx: CallContext | None = None
        self.chain: list[Middleware] = []
        self.reverse: list[ReverseHook] = []
        # What the input's failure is answered with (Input.FAILED).
        self.input_error: BaseException | None = None
        # The reader task, started only when input must be watched while the
        # handler runs (see _serve_handler), and its end; or, instead of a
        # task, the stream that calls back with that input (_watch).
        self.reader_scope: trio.CancelScope | None = None
        self.reader_done: trio.Event | None = None
        self.watched: InputWatcher | None = None
        # The scope of a late reply's write, for force_stop to cancel.
        self.send_scope: trio.CancelScope | None = None
        # Set once the call scope is over and a last reply is due.
        self.late_deadline: float | None = None

    def force_stop(self) -> None:
        self.state.stop_call(Stop.FORCED)
        self.scope.cancel()
        if self.send_scope is not None:
            self.send_scope.cancel()

    def _event(self, event: ServerEvent) -> None:
        """Report ``event`` to the state machine and do what it asks."""
        action = self.state.handle(event)
        if action is not Action.NONE:
            self._act(action)

    def _act(self, action: Action) -> None:
        if action is Action.CANCEL_CALL:  # only on the way into Output.GONE
            self.server._stats.peer_resets += 1
            self.scope.cancel()
        elif self.handler_scope is not None:
            self.handler_scope.cancel()
        else:
            self.state.stop_call(Stop.BAD_INPUT)
            self.scope.cancel()

    # -- the call --------------------------------------------------------------
    async def run(self) -> None:
        try:
            with self.scope:
                try:
                    await self._serve()
                finally:
                    self._unwatch()
                    if self.reader_done is not None:
                        await self._stop_reader()
            cancelled = self.scope.cancelled_caught
            ending = self.state.end(
                cancelled=cancelled,
                deadline_passed=cancelled
                and trio.current_time() >= self.scope.deadline,
            )
            if ending.stop is Stop.TIMED_OUT:
                self.server._stats.timeouts += 1
            if ending.action is EndAction.RESET:
                assert ending.code is not None
                await self._reset(ending.code)
            elif ending.action is EndAction.REPLY:
                await self._reply_late(
                    self.input_error
                    if ending.stop is Stop.BAD_INPUT and self.input_error is not None
                    else RPCTimedOut()
                )
            elif ending.action is EndAction.DRAIN:
                await self._drain(in_call_scope=False)
        except Exception as bug:
            await self._own_bug(bug)
        finally:
            if self.state.input is Input.DROPPED:
                dropping = dropper(self.stream)
                assert dropping is not None
                dropping.close_dropping_input()
            elif self.state.graceful:
                # FIN both ways: nothing left for a forceful close to abort.
                closing = eager(self.stream)
                if closing is not None:
                    # Nothing to wait for, and the call's task ends here: no
                    # checkpoint of its own (one scheduling round less per
                    # call over QUIC; the call waited for its input's FIN).
                    closing.close()
                else:
                    await self.stream.aclose()
            else:
                await trio.aclose_forcefully(self.stream)

    async def _drain(self, *, in_call_scope: bool) -> None:
        """Read (and drop) the client's input until its FIN, up to ``linger``:
        a TCP peer would see an RST if we closed with its data unread.

        ``in_call_scope``: we are in the call scope, whose deadline (lifted
        by now, unless kept) is brought down to ``linger`` instead of opening
        a scope of its own (unary calls are the hot path); its passing then
        ends the call as a lingering timeout.
        """
        if self.state.input is not Input.OPEN or self.state.output is Output.GONE:
            return
        if (
            self.reader_done is None
            and not self.conn.eof
            and self.state.output is Output.CLOSED
            and dropper(self.stream) is not None
        ):
            # No task need read to the FIN: the stream drops the rest as it
            # comes (run() closes it so). The caller's FIN comes after our
            # answer (js-rpc's order), and waiting for it took the call task
            # another step; a caller that never sends it holds a stream of
            # its own stream limit, not a task or slot of ours.
            self._event(ServerEvent.DROP_INPUT)
            return
        self._event(ServerEvent.DRAIN)
        self.server._release(self)  # answered: lingering holds no slot
        linger = self.server.linger
        if self.reader_done is not None:
            with trio.move_on_after(linger):
                await self.reader_done.wait()
            return
        if self.conn.eof:
            self._event(ServerEvent.INPUT_END)
            return
        # Raw bytes: past a raw call's header, or past input that lost framing.
        if in_call_scope:
            deadline = trio.current_time() + linger
            if deadline < self.scope.deadline:
                self.scope.deadline = deadline
        with _NO_SCOPE if in_call_scope else trio.move_on_after(linger):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self._event(ServerEvent.INPUT_END)

    async def _not_served(self, method: str) -> None:
        # js-rpc answers a method it does not serve by cancelling the stream
        # with code 1, never with a JSON reply, and its callers depend on
        # that: Polykey's agent swallows ErrorRPCHandlerFailed (what code 1
        # becomes) from its fire-and-forget calls and crashes on anything
        # else, -32601 included.  So where the transport can reset (QUIC,
        # MemoryStream) we do as js-rpc does; where it cannot (TCP, the
        # control socket's Unix stream) the JSON error is the only way to
        # say why.
        self.server._stats.unknown_methods += 1
        if isinstance(self.stream, ResettableStream):
            _log.info(
                "method %r not served (peer %s): stream reset with code %d",
                method[:100],
                _peer(self.transport),
                StreamCode.HANDLER_FAILED,
            )
            await self._reset(StreamCode.HANDLER_FAILED)
        else:
            await self._send_error(RPCMethodNotFound(f"method {method!r} not found"))

    async def _own_bug(self, bug: Exception) -> None:
        # A bug of the server's own where the call ends: -32603 if no message
        # of the answer has gone out (as js-rpc answers an internal error),
        # else nothing more can be said and the stream is reset (run()'s
        # forceful close).  The reply is a constant: the code that builds
        # replies may be what failed.
        output = self.state.output
        replyable = output is Output.RUNNING or output is Output.AWAITING_HEADER
        self.server._internal_error(
            "RPC call", self.transport, bug,
            "answered -32603" if replyable else "stream reset",
        )  # fmt: skip
        if not replyable:
            return
        self.late_deadline = trio.current_time() + _REPLY_GRACE
        self.server._stats.error_responses += 1
        with trio.CancelScope(shield=True):
            try:
                await self._send_value(_INTERNAL_ERROR_REPLY)
            except trio.BrokenResourceError:
                return
            await self._finish()
            await self._drain(in_call_scope=False)

    async def _reset(self, code: int) -> None:
        self.server._stats.resets += 1
        self._event(ServerEvent.RESET)
        await reset_stream(self.stream, code)

    async def _reply_late(self, exc: BaseException) -> None:
        # The call scope is done; answer under a short shielded scope so a
        # peer that stopped reading cannot hold the task.
        self.late_deadline = trio.current_time() + _REPLY_GRACE
        with trio.CancelScope(shield=True):
            await self._send_error(exc)
        if self.state.output is Output.TORN:
            await self._reset(StreamCode.TIMED_OUT)

    async def _serve(self) -> None:
        server = self.server
        try:
            # The task's first step: a request already here is read in it.
            value = await self.conn.receive(eager=True)
        except trio.BrokenResourceError:
            self._event(ServerEvent.PEER_GONE)
            return
        except RPCError as exc:  # bad JSON or oversize: no header to speak of
            await self._send_error(exc)
            return
        if value is EOF:
            self._event(ServerEvent.INPUT_END)
            return  # missing header: nothing to answer
        try:
            request = as_request(parse_request(value))
        except RPCError as exc:
            await self._send_error(exc)
            return
        handler = server.manifest.get(request.method)
        if handler is None:
            await self._not_served(request.method)
            return
        self._event(ServerEvent.HEADER)
        by_method = server._stats.calls_by_method
        by_method[request.method] = by_method.get(request.method, 0) + 1
        params = request.params
        metadata: dict[str, Any] = {}
        if isinstance(params, dict) and isinstance(params.get("metadata"), dict):
            metadata = params["metadata"]
        ctx = self.ctx = CallContext(
            request.method, "server", self.scope, metadata, self.transport
        )
        # Restart the timer: the handler's own timeout, else the default.
        ctx.set_timeout(
            handler.timeout if handler.timeout is not None else server.timeout
        )
        if isinstance(handler, RawHandler):
            await self._serve_raw(handler, request, ctx)
            return
        self.chain = build_chain(ctx, server._middleware)
        self.reverse = reverse_hooks(self.chain)
        try:
            if params is not None and not isinstance(params, dict):
                raise RPCInvalidParams("params must be a JSON object")
            request = await run_forward(self.chain, request)
            first = handler.parse_params(request.params)
        except Exception as exc:
            await self._send_error(exc)
            return
        await self._serve_handler(handler, first, ctx)

    async def _serve_handler(
        self, handler: Handler[Any, Any], first: Any, ctx: CallContext
    ) -> None:
        # The rest of the input is read by a reader task (see _reader) while
        # the handler runs: it feeds client-streaming and duplex handlers, and
        # notices a peer that resets or sends garbage.  A unary handler that
        # answers without ever waiting needs no watching, so its reader starts
        # only when the handler first waits; the call task then reads the
        # client's FIN itself.  Where nothing is fed (unary and server
        # streaming) and the stream can call back (QUIC's, MemoryStream's),
        # the stream is watched instead of by a task (_watch).
        recv_ch: trio.MemoryReceiveChannel[Any] | None = None
        if isinstance(handler, ClientHandler | DuplexHandler):
            send_ch, recv_ch = trio.open_memory_channel[Any](0)
            self._start_reader(handler, first, send_ch)
        if isinstance(handler, UnaryHandler):
            # No scope of its own (one less per call): bad input seen while a
            # unary handler runs cancels the call scope, and run() answers.
            try:
                await self._dispatch(handler, first, None, ctx)
            except Exception as exc:
                await self._send_error(exc)
        else:
            with trio.CancelScope() as self.handler_scope:
                if recv_ch is None:
                    # In the handler's scope: a watch reads what is here at
                    # once, and bad input there cancels the handler, as
                    # when a reader task finds it.
                    self._start_reader(handler, first, None)
                try:
                    if recv_ch is not None:
                        async with recv_ch:
                            await self._dispatch(handler, first, recv_ch, ctx)
                    else:
                        await self._dispatch(handler, first, None, ctx)
                except Exception as exc:
                    await self._send_error(exc)
        if recv_ch is not None:
            recv_ch.close()
        if self.input_error is not None:
            await self._send_error(self.input_error)
        if self.state.output is Output.CLOSED:
            await self._drain(in_call_scope=True)

    async def _dispatch(
        self,
        handler: Handler[Any, Any],
        first: Any,
        input: trio.MemoryReceiveChannel[Any] | None,
        ctx: CallContext,
    ) -> None:
        if isinstance(handler, UnaryHandler):
            pending = handler.handle(first, ctx)
            if isinstance(pending, Coroutine):
                result = await _OnFirstBlock(
                    pending, lambda: self._start_reader(handler, first, None)
                )
            else:  # some other awaitable: watch the input throughout
                self._start_reader(handler, first, None)
                result = await pending
            await self._send_result(result, last=True)
        elif isinstance(handler, ServerHandler):
            await self._send_stream(handler.handle(first, ctx))
        elif isinstance(handler, ClientHandler):
            assert input is not None
            await self._send_result(await handler.handle(input, ctx), last=True)
        elif isinstance(handler, DuplexHandler):
            assert input is not None
            await self._send_stream(handler.handle(input, ctx))
        else:  # pragma: no cover - checked in RPCServer.__init__
            raise TypeError(f"unknown handler type {type(handler).__name__}")
        await self._finish()

    async def _send_stream(self, results: AsyncIterator[Any]) -> None:
        try:
            async for result in results:
                await self._send_result(result)
        finally:
            aclose = getattr(results, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- the reader ------------------------------------------------------------
    def _start_reader(
        self,
        handler: Handler[Any, Any],
        first: Any,
        channel: trio.MemorySendChannel[Any] | None,
    ) -> None:
        if self.reader_done is not None or self.watched is not None:
            return
        if channel is None:
            watched = watcher(self.stream)
            if watched is not None:
                self._watch(watched)
                return
        self.reader_scope = trio.CancelScope()
        self.reader_done = trio.Event()
        nursery = self.server._nursery
        try:
            if nursery is None:
                raise RuntimeError("the server is not running")
            nursery.start_soon(self._run_reader, handler, first, channel)
        except RuntimeError:
            # The server's nursery is closing: this call is being stopped.
            self.reader_done.set()
            if channel is not None:
                channel.close()
            self.force_stop()

    async def _run_reader(
        self,
        handler: Handler[Any, Any],
        first: Any,
        channel: trio.MemorySendChannel[Any] | None,
    ) -> None:
        # A task of the server's nursery, stopped by the call (_stop_reader)
        # before the call ends.
        assert self.reader_scope is not None
        assert self.reader_done is not None
        try:
            with self.reader_scope:
                await self._reader(handler, first, channel)
        except Exception:
            self.server._internal_error("RPC call's reader", self.transport)
            self.scope.cancel()
        finally:
            self.reader_done.set()

    async def _stop_reader(self) -> None:
        assert self.reader_scope is not None
        assert self.reader_done is not None
        self.reader_scope.cancel()
        if not self.reader_done.is_set():
            with trio.CancelScope(shield=True):
                await self.reader_done.wait()

    async def _reader(
        self,
        handler: Handler[Any, Any],
        first: Any,
        channel: trio.MemorySendChannel[Any] | None,
    ) -> None:
        try:
            if channel is not None:
                try:
                    await self._feed(handler, first, channel)
                except Exception as exc:
                    # Cancel the handler before its input ends, or it could
                    # answer as if the input were complete.
                    self._input_failed(exc)
                    return
                finally:
                    channel.close()
            while await self.conn.receive() is not EOF:
                pass  # input nobody asked for, as js-rpc ignores it
        except Exception as exc:
            self._input_over(exc)
        else:
            self._input_over(None)

    # What a reader task does, without the task: a call that needs no task
    # to feed its handler costs none to watch its input (a task's start, its
    # step at the caller's FIN, and the call task's step after it).
    def _watch(self, stream: InputWatcher) -> None:
        self.watched = stream
        # Input here already is read now; the rest as it comes.
        self._input_arrived()
        if self.watched is not None:
            stream.watch_input(self._input_arrived)

    def _input_arrived(self) -> None:
        """The watched stream's input: read what is here, as the reader
        task's loop does, from the transport or the call task's wait
        (_OnFirstBlock), neither of which may see an exception."""
        over: Exception | None = None
        try:
            try:
                while self.conn.receive_nowait() is not EOF:
                    pass  # input nobody asked for, as js-rpc ignores it
            except trio.WouldBlock:
                return
            except Exception as exc:
                over = exc
            self._unwatch()
            self._input_over(over)
        except Exception:
            # A bug of ours, as in a reader task (_run_reader).
            self._unwatch()
            self.server._internal_error("RPC call's input watch", self.transport)
            self.scope.cancel()

    def _unwatch(self) -> None:
        if self.watched is not None:
            self.watched.watch_input(None)
            self.watched = None

    def _input_over(self, exc: Exception | None) -> None:
        """The input's end, seen by its reader (task or watch): the FIN
        (``exc`` None), or what reading raised."""
        if exc is None:
            self._event(ServerEvent.INPUT_END)
        elif not isinstance(exc, trio.ClosedResourceError):
            self._input_failed(exc)  # a reset (BrokenResourceError) too

    def _input_failed(self, exc: BaseException) -> None:
        if isinstance(exc, trio.BrokenResourceError):
            self._event(ServerEvent.INPUT_BROKE)
            return
        if not self.state.answered:
            self.input_error = exc  # answered later, a bug as -32603
        elif not is_answer(exc):
            # Nobody left to tell, but a bug (in parse_params or a
            # middleware) is still seen.
            self.server._handler_bug(
                exc, self._method(), self.transport,
                part="input of", outcome="the call had answered",
            )  # fmt: skip
        self._event(ServerEvent.INPUT_FAILED)

    def _method(self) -> str:
        return self.ctx.method if self.ctx is not None else "?"

    async def _feed(
        self,
        handler: Handler[Any, Any],
        first: Any,
        channel: trio.MemorySendChannel[Any],
    ) -> None:
        item = first  # the header's params are the first input
        while True:
            try:
                await channel.send(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the handler is done with its input
            value = await self.conn.receive()
            if value is EOF:
                return
            request = await run_forward(self.chain, as_request(parse_request(value)))
            item = handler.parse_params(request.params)

    # -- output ----------------------------------------------------------------
    async def _send_value(self, value: Any, *, last: bool = False) -> None:
        # ``last``: the FIN goes with the value (see _finish).
        state = self.state
        if state.output is _TORN:
            raise trio.BrokenResourceError("an earlier send was interrupted")
        if self.late_deadline is not None:
            await self._send_value_late(value, last)
            return
        # A message goes out whole or the stream is reset.  Cancelling the
        # handler (say, for bad input) must not cut a message in half: that
        # waits for the write to end (Output.SENDING_THEN_CANCEL).  What can
        # still cut a send short is the call's deadline, a forced stop, or a
        # scope outside the call: that leaves the stream torn.  A
        # cancellation already pending stops us before anything is sent.
        await trio.lowlevel.checkpoint_if_cancelled()
        data = _encode_reply(value)  # one that cannot be fails unsent
        state.handle(_SEND)  # never owes an action
        try:
            # A last message goes in the handler's step (the call ends after
            # it): a unary reply costs no scheduling round of its own.
            await self.conn.send_encoded(data, last=last, eager=last)
        except trio.BrokenResourceError:
            self._event(ServerEvent.PEER_GONE)
            raise
        except trio.Cancelled:
            self._event(ServerEvent.SEND_CUT)
            raise
        action = state.handle(_SENT_LAST if last else _SENT)
        if action is not _NO_ACTION:
            self._act(action)

    async def _send_value_late(self, value: Any, last: bool) -> None:
        # The last reply after the call scope ended: bounded by its own short
        # deadline (and a forced stop), shielded from everything else.
        assert self.late_deadline is not None
        data = _encode_reply(value)
        with trio.CancelScope(shield=True, deadline=self.late_deadline) as scope:
            self.send_scope = scope
            if self.state.stop is Stop.FORCED:
                scope.cancel()
            self._event(ServerEvent.SEND)
            try:
                await self.conn.send_encoded(data, last=last)
            except trio.BrokenResourceError:
                self.send_scope = None
                self._event(ServerEvent.PEER_GONE)
                raise
            self._event(ServerEvent.SENT_LAST if last else ServerEvent.SENT)
        self.send_scope = None
        if scope.cancelled_caught:
            self._event(ServerEvent.SEND_CUT)
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("send interrupted")

    async def _send_result(self, result: Any, *, last: bool = False) -> None:
        if self.state.answered:
            return
        if self.reverse:
            message: Response | ErrorResponse = Response(result)
            for hook in self.reverse:
                message = await hook(message)
            wire = message.to_wire()
        else:
            wire = result_wire(result)
        if self.ctx is not None:
            self.ctx.proof_of_life()
        await self._send_value(wire, last=last)

    async def _send_error(self, exc: BaseException) -> None:
        if self.state.answered or self.state.output is Output.GONE:
            return
        if not is_answer(exc):
            exc = self.server._handler_bug(exc, self._method(), self.transport)
        wire = error_to_wire(exc)
        message: Response | ErrorResponse = ErrorResponse(
            ErrorObject(wire["code"], wire["message"], wire["data"])
        )
        try:
            message = await run_reverse(self.chain, message)
        except Exception as bug:
            # The error goes out as it was; the middleware's bug is seen.
            self.server._handler_bug(
                bug, self._method(), self.transport,
                part="middleware on", outcome="its error reply sent unchanged",
            )  # fmt: skip
        self.server._stats.error_responses += 1
        try:
            await self._send_value(message.to_wire())
        except trio.BrokenResourceError:
            return
        await self._finish()

    async def _finish(self) -> None:
        if self.state.output not in (Output.RUNNING, Output.RAW):
            return
        # Closed before the FIN is awaited: the input's trouble no longer
        # matters from here (see _state.py).
        self._event(ServerEvent.FIN)
        try:
            await self.stream.send_eof()
        except trio.BrokenResourceError:
            self._event(ServerEvent.PEER_GONE)
        except trio.ClosedResourceError:
            pass

    # -- raw calls ---------------------------------------------------------------
    async def _serve_raw(
        self, handler: RawHandler, request: Request, ctx: CallContext
    ) -> None:
        async def accept(result: Any) -> trio.abc.HalfCloseableStream:
            ctx.proof_of_life()
            # The leading response goes out alone, before any raw byte: the JS
            # client cannot split the two if they arrive in one read.
            await self._send_value(Response(result).to_wire())
            self._event(ServerEvent.ACCEPT_RAW)
            return RawStream(self.stream, self.conn.take_leftover())

        call = RawCall(request.params, accept)
        try:
            await handler.handle(call, ctx)
        except trio.BrokenResourceError:
            if call.accepted or self.state.output is Output.GONE:
                self._event(ServerEvent.PEER_GONE)
                return
            await self._send_error(RPCOutputStreamError("raw handler stream broke"))
            return
        except Exception as exc:
            if not call.accepted:
                await self._send_error(exc)
                return
            if not is_answer(exc):
                # Past the leading response there is no error reply to give.
                self.server._handler_bug(
                    exc, ctx.method, self.transport,
                    part="raw handler", outcome="stream reset",
                )  # fmt: skip
            await self._reset(StreamCode.HANDLER_FAILED)
            return
        if not call.accepted:
            await self._send_error(
                RPCMissingResponse("raw handler returned without accepting")
            )
            return
        await self._finish()
        await self._drain(in_call_scope=False)
