"""Client manifests: declare callers as class attributes, get typed methods.

::

    class AgentAPI(ClientManifest):
        echo = UnaryCaller[EchoIn, EchoOut]()
        count = ServerCaller[CountIn, int]("countTo")  # wire name differs

    client = RPCClient(AgentAPI, factory)
    out = await client.methods.echo({"text": "hi"})       # EchoOut
    async with client.methods.count({"n": 3}) as results:
        async for n in results: ...

Each caller is a descriptor: on the class it is itself, on a manifest
instance bound to a client it is a callable with the right signature, so
type checkers see every method without any ``__getattr__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, cast, overload

from ._handlers import HandlerKind
from ._messages import JSONValue

if TYPE_CHECKING:
    from ._client import (
        ClientStreamCall,
        DuplexCall,
        RawClientCall,
        RPCClient,
        ServerStreamCall,
    )

__all__ = [
    "ClientCaller",
    "ClientManifest",
    "DuplexCaller",
    "RawCaller",
    "ServerCaller",
    "UnaryCaller",
]

InT = TypeVar("InT")
OutT = TypeVar("OutT")


class ClientManifest:
    """Base of client manifests; the client instantiates it bound to itself."""

    def __init__(self, client: RPCClient[Any]) -> None:
        self.client = client

    @classmethod
    def callers(cls) -> dict[str, _Caller[Any, Any]]:
        """The declared callers by attribute name."""
        out: dict[str, _Caller[Any, Any]] = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if isinstance(value, _Caller):
                    out[key] = value
        return out


class _Caller(Generic[InT, OutT]):
    kind: ClassVar[HandlerKind]

    def __init__(self, name: str | None = None) -> None:
        self._name = name

    def __set_name__(self, owner: type, name: str) -> None:
        if self._name is None:
            self._name = name

    @property
    def name(self) -> str:
        if self._name is None:
            raise RuntimeError("caller is not bound to a manifest attribute")
        return self._name


class _Bound:
    __slots__ = ("_client", "_name")

    def __init__(self, client: RPCClient[Any], name: str) -> None:
        self._client = client
        self._name = name

    @property
    def method(self) -> str:
        return self._name


class BoundUnary(_Bound, Generic[InT, OutT]):
    async def __call__(
        self,
        params: InT,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> OutT:
        result = await self._client.unary(
            self._name,
            params,
            rpc_timeout=rpc_timeout,
            metadata=metadata,
            keep_deadline=keep_deadline,
        )
        return cast(OutT, result)


class BoundServer(_Bound, Generic[InT, OutT]):
    def __call__(
        self,
        params: InT,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AbstractAsyncContextManager[ServerStreamCall[OutT]]:
        return self._client.server_stream(
            self._name,
            params,
            rpc_timeout=rpc_timeout,
            metadata=metadata,
            keep_deadline=keep_deadline,
        )


class BoundClient(_Bound, Generic[InT, OutT]):
    def __call__(
        self,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AbstractAsyncContextManager[ClientStreamCall[InT, OutT]]:
        return self._client.client_stream(
            self._name,
            rpc_timeout=rpc_timeout,
            metadata=metadata,
            keep_deadline=keep_deadline,
        )


class BoundDuplex(_Bound, Generic[InT, OutT]):
    def __call__(
        self,
        *,
        rpc_timeout: float | None = None,
        metadata: Mapping[str, JSONValue] | None = None,
        keep_deadline: bool = False,
    ) -> AbstractAsyncContextManager[DuplexCall[InT, OutT]]:
        return self._client.duplex(
            self._name,
            rpc_timeout=rpc_timeout,
            metadata=metadata,
            keep_deadline=keep_deadline,
        )


class BoundRaw(_Bound):
    def __call__(
        self,
        header: JSONValue = None,
        *,
        rpc_timeout: float | None = None,
        keep_deadline: bool = False,
    ) -> AbstractAsyncContextManager[RawClientCall]:
        return self._client.raw(
            self._name, header, rpc_timeout=rpc_timeout, keep_deadline=keep_deadline
        )


class UnaryCaller(_Caller[InT, OutT]):
    kind = "UNARY"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: ClientManifest, owner: type) -> BoundUnary[InT, OutT]: ...
    def __get__(
        self, obj: ClientManifest | None, owner: type
    ) -> Self | BoundUnary[InT, OutT]:
        if obj is None:
            return self
        return BoundUnary(obj.client, self.name)


class ServerCaller(_Caller[InT, OutT]):
    kind = "SERVER"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: ClientManifest, owner: type) -> BoundServer[InT, OutT]: ...
    def __get__(
        self, obj: ClientManifest | None, owner: type
    ) -> Self | BoundServer[InT, OutT]:
        if obj is None:
            return self
        return BoundServer(obj.client, self.name)


class ClientCaller(_Caller[InT, OutT]):
    kind = "CLIENT"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: ClientManifest, owner: type) -> BoundClient[InT, OutT]: ...
    def __get__(
        self, obj: ClientManifest | None, owner: type
    ) -> Self | BoundClient[InT, OutT]:
        if obj is None:
            return self
        return BoundClient(obj.client, self.name)


class DuplexCaller(_Caller[InT, OutT]):
    kind = "DUPLEX"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: ClientManifest, owner: type) -> BoundDuplex[InT, OutT]: ...
    def __get__(
        self, obj: ClientManifest | None, owner: type
    ) -> Self | BoundDuplex[InT, OutT]:
        if obj is None:
            return self
        return BoundDuplex(obj.client, self.name)


class RawCaller(_Caller[JSONValue, JSONValue]):
    kind = "RAW"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: ClientManifest, owner: type) -> BoundRaw: ...
    def __get__(self, obj: ClientManifest | None, owner: type) -> Self | BoundRaw:
        if obj is None:
            return self
        return BoundRaw(obj.client, self.name)
