"""Streaming JSON-RPC over any trio stream, wire-compatible with js-rpc 0.5.1.

One call is one bidirectional stream.  :class:`RPCServer` serves a manifest
of handlers (:class:`UnaryHandler`, :class:`ServerHandler`,
:class:`ClientHandler`, :class:`DuplexHandler`, :class:`RawHandler`);
:class:`RPCClient` makes calls declared in a :class:`ClientManifest`.
Timeouts are trio deadlines on both sides (see docs/rpc.md).  This package
knows nothing of QUIC: it runs over any :class:`trio.abc.HalfCloseableStream`
and, for tests and simulations, over :func:`memory_stream_pair`.
"""

from __future__ import annotations

from ._callers import (
    ClientCaller,
    ClientManifest,
    DuplexCaller,
    RawCaller,
    ServerCaller,
    UnaryCaller,
)
from ._client import (
    ClientStreamCall,
    DuplexCall,
    RawClientCall,
    RPCClient,
    ServerStreamCall,
    StreamFactory,
)
from ._codec import DEFAULT_MAX_MESSAGE_SIZE, JSONStreamDecoder, encode_json
from ._context import CallContext
from ._errors import (
    DEFAULT_ERROR_REGISTRY,
    ErrorCode,
    ErrorRegistry,
    RPCConnectionInternal,
    RPCConnectionKeepAliveTimeOut,
    RPCConnectionLocal,
    RPCConnectionPeer,
    RPCError,
    RPCHandlerAborted,
    RPCHandlerFailed,
    RPCInternalError,
    RPCInvalidParams,
    RPCInvalidRequest,
    RPCMessageLength,
    RPCMethodNotFound,
    RPCMissingCaller,
    RPCMissingHeader,
    RPCMissingResponse,
    RPCOutputStreamError,
    RPCParseError,
    RPCRemoteError,
    RPCRemoteTimedOut,
    RPCStopping,
    RPCStreamEnded,
    RPCStreamReset,
    RPCTimedOut,
    StreamCode,
    error_from_wire,
    error_to_wire,
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
from ._memory import MemoryStream, memory_stream_pair
from ._messages import (
    ErrorObject,
    ErrorResponse,
    JSONObject,
    JSONValue,
    Notification,
    Request,
    Response,
    parse_request,
    parse_response,
)
from ._middleware import (
    ClientTimeoutMiddleware,
    Middleware,
    MiddlewareFactory,
    ServerTimeoutMiddleware,
)
from ._raw import RawStream
from ._server import RPCServer, ServerStatistics
from ._stream import ResettableStream, RPCStream, StreamResetError

__all__ = [
    "DEFAULT_ERROR_REGISTRY",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "CallContext",
    "ClientCaller",
    "ClientHandler",
    "ClientManifest",
    "ClientStreamCall",
    "ClientTimeoutMiddleware",
    "DuplexCall",
    "DuplexCaller",
    "DuplexHandler",
    "ErrorCode",
    "ErrorObject",
    "ErrorRegistry",
    "ErrorResponse",
    "Handler",
    "JSONObject",
    "JSONStreamDecoder",
    "JSONValue",
    "MemoryStream",
    "Middleware",
    "MiddlewareFactory",
    "Notification",
    "RPCClient",
    "RPCConnectionInternal",
    "RPCConnectionKeepAliveTimeOut",
    "RPCConnectionLocal",
    "RPCConnectionPeer",
    "RPCError",
    "RPCHandlerAborted",
    "RPCHandlerFailed",
    "RPCInternalError",
    "RPCInvalidParams",
    "RPCInvalidRequest",
    "RPCMessageLength",
    "RPCMethodNotFound",
    "RPCMissingCaller",
    "RPCMissingHeader",
    "RPCMissingResponse",
    "RPCOutputStreamError",
    "RPCParseError",
    "RPCRemoteError",
    "RPCRemoteTimedOut",
    "RPCServer",
    "RPCStopping",
    "RPCStream",
    "RPCStreamEnded",
    "RPCStreamReset",
    "RPCTimedOut",
    "RawCall",
    "RawCaller",
    "RawClientCall",
    "RawHandler",
    "RawStream",
    "Request",
    "ResettableStream",
    "Response",
    "ServerCaller",
    "ServerHandler",
    "ServerStatistics",
    "ServerStreamCall",
    "ServerTimeoutMiddleware",
    "StreamCode",
    "StreamFactory",
    "StreamResetError",
    "UnaryCaller",
    "UnaryHandler",
    "encode_json",
    "error_from_wire",
    "error_to_wire",
    "memory_stream_pair",
    "parse_request",
    "parse_response",
]
