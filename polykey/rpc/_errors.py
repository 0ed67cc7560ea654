"""RPC exceptions, their JSON-RPC codes, and their form on the wire.

Every class here carries ``code`` (the JSON-RPC error code js-rpc uses) and
``wire_type`` (the name js-rpc gives the same error, so a JS peer rebuilds
it).  A handler's exception goes on the wire as ``{type, message, code,
data}`` and nothing else: no stack trace, no path, no cause chain.

On the receiving side :func:`error_from_wire` turns the ``error`` member of
a response into an :class:`RPCRemoteError` naming the remote type and
message, with the exception rebuilt from the :class:`ErrorRegistry` as its
``__cause__`` when the type is registered.  It understands the shapes a
js-rpc 0.5.1 server sends too: ``{type, message, data:{stack,...}}`` for
plain JS errors, ``{type, data:{message, ...}}`` for ``AbstractError``
subclasses, and ``{code, message, data}`` for its protocol errors.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Protocol

import trio

from ..errors import PolykeyError

_log = logging.getLogger("polykey.rpc")

__all__ = [
    "DEFAULT_ERROR_REGISTRY",
    "ErrorCode",
    "ErrorRegistry",
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
    "RPCStopping",
    "RPCStreamEnded",
    "RPCStreamReset",
    "RPCTimedOut",
    "StreamCode",
    "WireShapedError",
    "code_for_exception",
    "error_from_wire",
    "error_to_wire",
]


class ErrorCode(enum.IntEnum):
    """JSON-RPC error codes (js-rpc's ``JSONRPCResponseErrorCode``)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    HANDLER_NOT_FOUND = -32000
    RPC_STOPPING = -32001
    RPC_MESSAGE_LENGTH = -32003
    RPC_MISSING_RESPONSE = -32004
    RPC_OUTPUT_STREAM_ERROR = -32005
    RPC_REMOTE = -32006
    RPC_STREAM_ENDED = -32007
    RPC_TIMED_OUT = -32008
    RPC_CONNECTION_LOCAL = -32010
    RPC_CONNECTION_PEER = -32011
    RPC_CONNECTION_KEEP_ALIVE_TIME_OUT = -32012
    RPC_CONNECTION_INTERNAL = -32013
    MISSING_HEADER = -32014
    HANDLER_ABORTED = -32015
    MISSING_CALLER = -32016


class StreamCode(enum.IntEnum):
    """Application codes for cancelling a stream (Polykey's nodes utils)."""

    UNKNOWN = 0
    HANDLER_FAILED = 1
    MESSAGE_LENGTH = 2
    MISSING_RESPONSE = 3
    OUTPUT_STREAM = 4
    REMOTE = 5
    STREAM_ENDED = 6
    TIMED_OUT = 7


class RPCError(PolykeyError):
    """Base of every RPC error.  ``code`` is its JSON-RPC error code."""

    code: ClassVar[int] = ErrorCode.INTERNAL_ERROR
    wire_type: ClassVar[str] = "ErrorRPC"
    stream_code: ClassVar[StreamCode] = StreamCode.UNKNOWN
    default_message: ClassVar[str] = "RPC error"

    def __init__(self, message: str | None = None) -> None:
        self.message = self.default_message if message is None else message
        super().__init__(self.message)


class RPCParseError(RPCError):
    code = ErrorCode.PARSE_ERROR
    wire_type = "ErrorRPCParse"
    default_message = "Failed to parse Buffer stream"


class RPCInvalidRequest(RPCError):
    code = ErrorCode.INVALID_REQUEST
    wire_type = "ErrorRPCInvalidRequest"
    default_message = "Invalid JSON-RPC request"


class RPCMethodNotFound(RPCError):
    code = ErrorCode.METHOD_NOT_FOUND
    wire_type = "ErrorRPCMethodNotFound"
    stream_code = StreamCode.HANDLER_FAILED
    default_message = "Method not found"


class RPCInvalidParams(RPCError):
    code = ErrorCode.INVALID_PARAMS
    wire_type = "ErrorRPCInvalidParams"
    default_message = "Invalid paramaters provided to RPC"


class RPCInternalError(RPCError):
    code = ErrorCode.INTERNAL_ERROR
    wire_type = "ErrorRPCInternal"
    default_message = "Internal error"


class RPCHandlerFailed(RPCError):
    code = ErrorCode.HANDLER_NOT_FOUND
    wire_type = "ErrorRPCHandlerFailed"
    stream_code = StreamCode.HANDLER_FAILED
    default_message = "Failed to handle stream"


class RPCStopping(RPCError):
    code = ErrorCode.RPC_STOPPING
    wire_type = "ErrorRPCStopping"
    default_message = "RPC is stopping"


class RPCMessageLength(RPCError):
    code = ErrorCode.RPC_MESSAGE_LENGTH
    wire_type = "ErrorRPCMessageLength"
    stream_code = StreamCode.MESSAGE_LENGTH
    default_message = "RPC Message exceeds maximum size"

    def __init__(self, limit: int | str | None = None) -> None:
        if isinstance(limit, int):
            super().__init__(f"RPC message exceeds maximum size of {limit} bytes")
        else:
            super().__init__(limit)


class RPCMissingResponse(RPCError):
    code = ErrorCode.RPC_MISSING_RESPONSE
    wire_type = "ErrorRPCMissingResponse"
    stream_code = StreamCode.MISSING_RESPONSE
    default_message = "Stream ended before response"


class RPCOutputStreamError(RPCError):
    code = ErrorCode.RPC_OUTPUT_STREAM_ERROR
    wire_type = "ErrorRPCOutputStreamError"
    stream_code = StreamCode.OUTPUT_STREAM
    default_message = "Output stream failed, unable to send data"


class RPCStreamEnded(RPCError):
    code = ErrorCode.RPC_STREAM_ENDED
    wire_type = "ErrorRPCStreamEnded"
    stream_code = StreamCode.STREAM_ENDED
    default_message = "Handled stream has ended"


class RPCTimedOut(RPCError):
    code = ErrorCode.RPC_TIMED_OUT
    wire_type = "ErrorRPCTimedOut"
    stream_code = StreamCode.TIMED_OUT
    default_message = "RPC has timed out"


class RPCConnectionLocal(RPCError):
    code = ErrorCode.RPC_CONNECTION_LOCAL
    wire_type = "ErrorRPCConnectionLocal"
    default_message = "RPC Connection local error"


class RPCConnectionPeer(RPCError):
    code = ErrorCode.RPC_CONNECTION_PEER
    wire_type = "ErrorRPCConnectionPeer"
    default_message = "RPC Connection peer error"


class RPCConnectionKeepAliveTimeOut(RPCError):
    code = ErrorCode.RPC_CONNECTION_KEEP_ALIVE_TIME_OUT
    wire_type = "ErrorRPCConnectionKeepAliveTimeOut"
    default_message = "RPC Connection keep alive timeout"


class RPCConnectionInternal(RPCError):
    code = ErrorCode.RPC_CONNECTION_INTERNAL
    wire_type = "ErrorRPCConnectionInternal"
    default_message = "RPC Connection internal error"


class RPCMissingHeader(RPCError):
    code = ErrorCode.MISSING_HEADER
    wire_type = "ErrorMissingHeader"
    default_message = "Header information is missing"


class RPCHandlerAborted(RPCError):
    code = ErrorCode.HANDLER_ABORTED
    wire_type = "ErrorHandlerAborted"
    default_message = "Handler Aborted Stream"


class RPCMissingCaller(RPCError):
    code = ErrorCode.MISSING_CALLER
    wire_type = "ErrorMissingCaller"
    default_message = "Caller is missing"


class RPCRemoteError(RPCError):
    """The peer answered a call with an error.

    ``remote_type``, ``remote_message`` and ``remote_code`` are what the peer
    said; ``__cause__`` (also :attr:`error`) is the exception rebuilt from
    the registry when ``remote_type`` is registered, else ``None``.
    """

    code = ErrorCode.RPC_REMOTE
    wire_type = "ErrorRPCRemote"
    stream_code = StreamCode.REMOTE
    default_message = "The server responded with an error"

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_code: int | None = None,
        *,
        method: str | None = None,
    ) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_code = remote_code
        self.method = method
        where = f" from {method!r}" if method else ""
        super().__init__(f"remote {remote_type}{where}: {remote_message}")

    @property
    def error(self) -> BaseException | None:
        return self.__cause__


class RPCRemoteTimedOut(RPCRemoteError, RPCTimedOut):
    """The peer reported that the call timed out (an :class:`RPCTimedOut`)."""

    code = ErrorCode.RPC_REMOTE
    wire_type = "ErrorRPCRemote"
    stream_code = StreamCode.TIMED_OUT


class RPCStreamReset(RPCError, trio.BrokenResourceError):
    """The peer cancelled the call's stream with an application ``reset_code``:
    by RESET_STREAM (``reset`` true) or STOP_SENDING (``reset`` false).

    Also a :class:`trio.BrokenResourceError` and a
    :class:`~polykey.rpc.StreamAbort`: what our memory streams raise for an
    aborted stream, as QUIC streams raise ``QUICStreamError``.
    """

    code = ErrorCode.RPC_STREAM_ENDED
    wire_type = "ErrorRPCStreamEnded"

    def __init__(
        self, code: int, message: str | None = None, *, reset: bool = True
    ) -> None:
        self.reset_code = code
        self.reset = reset
        try:
            name = StreamCode(code).name.lower().replace("_", " ")
        except ValueError:
            name = "unknown"
        what = "reset" if reset else "stopped"
        super().__init__(message or f"stream {what} by peer with code {code} ({name})")


def code_for_exception(exc: BaseException | None) -> StreamCode:
    """The stream cancel code for a failure (Polykey's reason-to-code)."""
    if isinstance(exc, RPCError):
        return exc.stream_code
    return StreamCode.UNKNOWN


_ALL_LIBRARY_ERRORS: Final[tuple[type[RPCError], ...]] = (
    RPCParseError,
    RPCInvalidRequest,
    RPCMethodNotFound,
    RPCInvalidParams,
    RPCInternalError,
    RPCHandlerFailed,
    RPCStopping,
    RPCMessageLength,
    RPCMissingResponse,
    RPCOutputStreamError,
    RPCStreamEnded,
    RPCTimedOut,
    RPCConnectionLocal,
    RPCConnectionPeer,
    RPCConnectionKeepAliveTimeOut,
    RPCConnectionInternal,
    RPCMissingHeader,
    RPCHandlerAborted,
    RPCMissingCaller,
)


class ErrorRegistry:
    """Maps wire type names to exception classes that may be rebuilt.

    Only registered classes are ever instantiated from peer data, and only
    with a message string.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Callable[[str], BaseException]] = {}
        self._by_code: dict[int, type[RPCError]] = {}
        #: Registered classes (or factories) that raised instead of building
        #: the error from a peer's message: a registration bug, logged at
        #: WARNING; the caller gets the generic RPCRemoteError.
        self.rebuild_failures = 0

    def register(
        self,
        cls: type[BaseException],
        name: str | None = None,
        *,
        factory: Callable[[str], BaseException] | None = None,
    ) -> None:
        """Allow ``cls`` to be rebuilt from errors whose type is ``name``.

        ``name`` defaults to ``cls.wire_type`` for RPC errors, else the class
        name.  ``factory`` builds the instance from the message (default:
        ``cls(message)``).
        """
        if name is None:
            name = getattr(cls, "wire_type", None) or cls.__name__
        self._by_name[name] = factory or cls
        if (
            isinstance(cls, type)
            and issubclass(cls, RPCError)
            and cls
            not in (
                RPCRemoteError,
                RPCStreamReset,
            )
        ):
            self._by_code.setdefault(cls.code, cls)

    def copy(self) -> ErrorRegistry:
        new = ErrorRegistry()
        new._by_name = dict(self._by_name)
        new._by_code = dict(self._by_code)
        return new

    def rebuild(
        self,
        name: str | None,
        code: int | None,
        message: str,
        *,
        method: str | None = None,
        peer: str | None = None,
    ) -> BaseException | None:
        factory = self._by_name.get(name) if name else None
        if factory is None and code is not None and name is None:
            factory = self._by_code.get(code)
        if factory is None:
            return None
        try:
            return factory(message)
        except Exception:
            self.rebuild_failures += 1
            _log.warning(
                "the error class registered for %r failed to rebuild a reply "
                "to %r (peer %s); raised as a plain remote error",
                name if name is not None else code,
                (method or "?")[:100],
                peer or "?",
                exc_info=True,
            )
            return None


DEFAULT_ERROR_REGISTRY: Final = ErrorRegistry()
for _cls in _ALL_LIBRARY_ERRORS:
    DEFAULT_ERROR_REGISTRY.register(_cls)
#: Builtins a handler may raise as its answer (the default registry rebuilds
#: them); exactly these types, not their subclasses (RecursionError is a
#: RuntimeError, UnicodeDecodeError a ValueError: both are bugs).
_ANSWER_BUILTINS: Final = frozenset(
    {
        ValueError,
        TypeError,
        KeyError,
        LookupError,
        RuntimeError,
        NotImplementedError,
        PermissionError,
    }
)
for _builtin in _ANSWER_BUILTINS:
    DEFAULT_ERROR_REGISTRY.register(_builtin)
del _cls, _builtin

# A message is text for humans; keep it short and strip what looks like a
# local filesystem path so nothing about the host leaks to a peer.
_MAX_MESSAGE = 1024
_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[\w.\-]+[/\\])+[\w.\-]*")


def _scrub(message: str) -> str:
    message = _PATH.sub("<path>", message)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return message


def is_answer(exc: BaseException) -> bool:
    """Whether a handler's exception is meant for its caller: one of ours
    (``PolykeyError``), one that writes its own wire shape, or one of the
    builtins the default registry knows. Anything else is a bug, answered
    as -32603 without its text."""
    return (
        isinstance(exc, PolykeyError)
        or callable(getattr(exc, "rpc_error_data", None))
        or type(exc) in _ANSWER_BUILTINS
    )


class WireShapedError(Protocol):
    """A handler exception that writes the ``data`` of its error reply
    itself, for peers that expect their own error shape (Polykey's
    ``AbstractError`` JSON, for one).  ``message`` is already scrubbed."""

    def rpc_error_data(self, message: str) -> dict[str, Any]: ...


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """The ``error`` member of a JSON-RPC error response for ``exc``.

    Library errors keep their own code at the top level; anything a handler
    raises goes out as -32006 (remote), as js-rpc does.  ``data`` is
    ``{type, message, code, data: {stack}}`` where ``stack`` is only the
    ``"Type: message"`` line, so js-rpc's client can rebuild the types it
    knows (``TypeError``, ``ErrorRPCTimedOut``...).
    """
    shape = getattr(exc, "rpc_error_data", None)
    if callable(shape) and not isinstance(exc, RPCError):
        # The exception writes its own ``data`` (see WireShapedError).
        message = _scrub(str(exc.args[0]) if len(exc.args) == 1 else str(exc))
        data = shape(message)
        return {"code": int(ErrorCode.RPC_REMOTE), "message": message, "data": data}
    if isinstance(exc, RPCRemoteError):
        # Re-raising a downstream failure: say what it was, not where.
        name = exc.remote_type
        message = exc.remote_message
        code = int(ErrorCode.RPC_REMOTE)
        top = code
    elif isinstance(exc, RPCError):
        name = exc.wire_type
        message = exc.message
        code = int(exc.code)
        top = code
    else:
        name = type(exc).__name__
        message = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
        code = int(ErrorCode.RPC_REMOTE)
        top = code
    message = _scrub(message)
    # js-rpc's client rebuilds a known type only when data.data.stack is a
    # string: give it the one line a JS stack starts with, and no frames.
    stack = f"{name}: {message}" if message else name
    return {
        "code": top,
        "message": message,
        "data": {
            "type": name,
            "message": message,
            "code": code,
            "data": {"stack": stack},
        },
    }


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def error_from_wire(
    error: Mapping[str, Any],
    registry: ErrorRegistry = DEFAULT_ERROR_REGISTRY,
    *,
    method: str | None = None,
    peer: str | None = None,
) -> RPCRemoteError:
    """Build the exception a caller raises for a response's ``error`` member
    (``peer``: who sent it, for the log)."""
    top_code = _int(error.get("code"))
    top_message = _str(error.get("message")) or ""
    data = error.get("data")
    name: str | None = None
    message: str | None = None
    code: int | None = None
    if isinstance(data, Mapping):
        name = _str(data.get("type"))
        message = _str(data.get("message"))
        code = _int(data.get("code"))
        inner = data.get("data")
        if message is None and isinstance(inner, Mapping):
            message = _str(inner.get("message"))  # AbstractError.toJSON shape
    if not message:
        message = top_message
    if code is None:
        code = top_code
    rebuilt = registry.rebuild(name, code, message, method=method, peer=peer)
    if name is None:
        name = type(rebuilt).__name__ if rebuilt is not None else "Error"
        if isinstance(rebuilt, RPCError):
            name = rebuilt.wire_type
    cls = RPCRemoteTimedOut if isinstance(rebuilt, RPCTimedOut) else RPCRemoteError
    remote = cls(name, message, code, method=method)
    remote.__cause__ = rebuilt
    return remote
