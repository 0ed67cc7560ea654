"""Server-side handlers, one class per call type (as js-rpc's).

Subclass one and implement ``handle``.  ``InT`` is the type of each request's
params, ``OutT`` of each result; :meth:`Handler.parse_params` may validate and
convert the raw JSON (raise :class:`~polykey.rpc.RPCInvalidParams` to refuse
it).  A handler may declare ``timeout`` (seconds) to replace the server's
default for its method; the client's ``metadata.timeout`` can only shorten
it.  Handlers run inside the call's cancel scope (``ctx.cancel_scope``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import trio

from ._context import CallContext
from ._messages import JSONObject, JSONValue

if TYPE_CHECKING:
    from ._raw import RawStream

__all__ = [
    "ClientHandler",
    "DuplexHandler",
    "Handler",
    "HandlerKind",
    "RawCall",
    "RawHandler",
    "ServerHandler",
    "UnaryHandler",
]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

HandlerKind = Literal["UNARY", "SERVER", "CLIENT", "DUPLEX", "RAW"]


class Handler(Generic[InT, OutT]):
    """Base of the five handler types."""

    kind: ClassVar[HandlerKind]
    #: Seconds; ``None`` uses the server's default timeout.
    timeout: float | None = None

    def parse_params(self, params: JSONValue) -> InT:
        """Validate one request's params; raise RPCInvalidParams to refuse."""
        return cast(InT, params)


class UnaryHandler(Handler[InT, OutT]):
    """One request, one response."""

    kind = "UNARY"

    async def handle(self, params: InT, ctx: CallContext) -> OutT:
        raise NotImplementedError


class ServerHandler(Handler[InT, OutT]):
    """One request, a stream of responses: implement as an async generator."""

    kind = "SERVER"

    def handle(self, params: InT, ctx: CallContext) -> AsyncIterator[OutT]:
        raise NotImplementedError


class ClientHandler(Handler[InT, OutT]):
    """A stream of requests, one response."""

    kind = "CLIENT"

    async def handle(self, input: AsyncIterator[InT], ctx: CallContext) -> OutT:
        raise NotImplementedError


class DuplexHandler(Handler[InT, OutT]):
    """Streams both ways: an async generator consuming ``input``."""

    kind = "DUPLEX"

    def handle(
        self, input: AsyncIterator[InT], ctx: CallContext
    ) -> AsyncIterator[OutT]:
        raise NotImplementedError


class RawCall:
    """A raw call on the server: a JSON header, then raw bytes both ways.

    Call :meth:`accept` with the leading result (the client's header
    metadata) to get the raw byte stream; raising before that sends an
    error response instead.
    """

    def __init__(self, params: JSONValue, accept: Any) -> None:
        self.params = params
        self._accept = accept
        self._stream: RawStream | None = None

    @property
    def accepted(self) -> bool:
        return self._stream is not None

    async def accept(self, result: JSONValue = None) -> trio.abc.HalfCloseableStream:
        if self._stream is None:
            self._stream = await self._accept({} if result is None else result)
        return self._stream


class RawHandler(Handler[JSONValue, JSONObject]):
    """A JSON header then raw bytes; bypasses middleware."""

    kind = "RAW"

    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        raise NotImplementedError
