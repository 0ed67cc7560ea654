"""Hole-punch signalling, wire-compatible with Polykey 1.15.1.

Theory of operation
-------------------
Node A wants a connection to node B, which sits behind a NAT that drops
what B has not asked for. A node S that holds a live connection to both
relays A's wish to B, and both then send toward each other at once:

1. A calls ``S.nodesConnectionSignalInitial({"targetNodeIdEncoded": B,
   "signature": b64url(sign_A(rawA || rawB))})``.
2. S takes A's NodeId from A's verified certificate (never from a
   parameter), checks the signature, requires a live connection to B, and
   rate-limits per requesting NodeId (a token bucket: 20 tokens, 10 a
   second, forgotten a minute after its last use). It signs
   ``rawA || rawB || utf8(JSON {"host","port"} of A's address as S sees it)
   || raw request signature`` and calls, fire and forget,
   ``B.nodesConnectionSignalFinal({"sourceNodeIdEncoded": A,
   "targetNodeIdEncoded": B, "address": {"host", "port"},
   "requestSignature", "relaySignature"})``. It answers A at once with B's
   address as S's connection to B sees it: ``{"host", "port"}``.
3. B verifies both signatures (the relay signature over the address JSON
   exactly as it arrived, re-serialised compactly in its own key order, as
   Polykey's ``JSON.stringify`` does) and starts punching: small packets
   from its shared QUIC socket to A's address. Polykey's target sends 4 over
   15 s (at 0, 1, 3, 7 s); ours sprays at short jittered intervals
   (:func:`polykey.quic.spray_delays`) until A's connection arrives.
4. A dials B from its shared socket, re-sending its first Initial at the
   same short intervals, and also dials wherever B's punch packets came from
   (B's peer-reflexive address: a symmetric NAT maps B anew toward A).

Signatures are 64-byte Ed25519, base64url without padding; NodeIds are the
``v`` base32hex strings. A handler's failure goes out as Polykey's own error
class (JSON-RPC -32006 with ``data.type`` the class name and ``data.data``
its fields), so a Polykey agent rebuilds it. Note Polykey's naming: a bad
*request* signature at the signaller is reported as
``ErrorNodesConnectionSignalRelayVerificationFailed``; we do the same.

The checks and the rate limiter are pure (``now`` is an argument); the
handlers call into a :class:`SignalHost` (the node's connection manager)
for what needs the network.
"""

from __future__ import annotations

import datetime
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Protocol, TypeVar

import attrs

from ..keys import NodeId, NodeIdentity
from ..quic import Address
from ..rpc import (
    CallContext,
    JSONObject,
    JSONValue,
    RPCClient,
    RPCInvalidParams,
    UnaryHandler,
)
from ._address import NodeAddress
from ._errors import InvalidAddressError, NodesError
from ._wire import (
    JSONMapping,
    SignalFinalParams,
    SignalInitialParams,
    Signature,
    WireError,
    b64url_decode,
    b64url_encode,
    converter,
    structure,
)

__all__ = [
    "SIGNAL_FINAL",
    "SIGNAL_INITIAL",
    "ConnectionNotFoundError",
    "NodeIdMissingError",
    "NodesConnectionSignalFinal",
    "NodesConnectionSignalInitial",
    "RateLimiter",
    "RelayVerificationError",
    "RequestRateExceededError",
    "RequestVerificationError",
    "SignalError",
    "SignalHost",
    "SignalRequest",
    "address_json",
    "b64url_decode",
    "b64url_encode",
    "caller_node_id",
    "node_id_param",
    "relay_data",
    "request_data",
    "request_signal",
    "verify_final",
]

SIGNAL_INITIAL: Final = "nodesConnectionSignalInitial"
SIGNAL_FINAL: Final = "nodesConnectionSignalFinal"

T = TypeVar("T")


# -- errors on the wire -----------------------------------------------------------

_UNAVAILABLE: Final = 69  # sysexits EX_UNAVAILABLE
_TEMPFAIL: Final = 75  # sysexits EX_TEMPFAIL


class SignalError(NodesError):
    """A signalling request refused; goes out as Polykey's error class."""

    wire_type: ClassVar[str] = "ErrorPolykey"
    description: ClassVar[str] = ""
    exit_code: ClassVar[int] = _UNAVAILABLE

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    def rpc_error_data(self, message: str) -> dict[str, Any]:
        """Polykey's ``AbstractError`` JSON (see polykey.rpc.WireShapedError)."""
        timestamp = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="milliseconds"
        )
        return {
            "type": self.wire_type,
            "data": {
                "message": message,
                "timestamp": timestamp.replace("+00:00", "Z"),
                "data": {},
                "stack": f"{self.wire_type}: {message}" if message else self.wire_type,
                "description": self.description,
                "exitCode": self.exit_code,
            },
        }


class NodeIdMissingError(SignalError):
    wire_type = "ErrorAgentNodeIdMissing"
    description = "Unable to obtain NodeId from connection certificates"


class RequestVerificationError(SignalError):
    wire_type = "ErrorNodesConnectionSignalRequestVerificationFailed"
    description = "Failed to verify request message signature"


class RelayVerificationError(SignalError):
    wire_type = "ErrorNodesConnectionSignalRelayVerificationFailed"
    description = "Failed to verify relay message signature"


class ConnectionNotFoundError(SignalError):
    wire_type = "ErrorNodeConnectionManagerConnectionNotFound"
    description = "No existing connection was found for target NodeId"
    exit_code = _TEMPFAIL


class RequestRateExceededError(SignalError):
    wire_type = "ErrorNodeConnectionManagerRequestRateExceeded"
    description = "Rate limit exceeded while making request"
    exit_code = _TEMPFAIL


# -- pure pieces ----------------------------------------------------------------------


def address_json(address: Mapping[str, Any]) -> bytes:
    """The bytes the relay signature covers for ``address``: compact JSON in
    the mapping's own key order, as JavaScript's ``JSON.stringify`` writes
    it (for the strings and integers an address holds)."""
    return json.dumps(address, separators=(",", ":"), ensure_ascii=False).encode()


def request_data(source: NodeId, target: NodeId) -> bytes:
    """What the requester signs: raw source NodeId then raw target NodeId."""
    return source.raw + target.raw


def relay_data(
    source: NodeId, target: NodeId, address: bytes, request_signature: bytes
) -> bytes:
    """What the signaller signs: ids, the address JSON, the request signature."""
    return source.raw + target.raw + address + request_signature


def _verify(signer: NodeId, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        signer.public_key().verify(signature, data)
    except InvalidSignature:
        return False
    return True


def node_id_param(value: object, what: str) -> NodeId:
    """An encoded NodeId parameter; RPCInvalidParams naming ``what`` if not."""
    try:
        return converter.structure(value, NodeId)
    except WireError:
        raise RPCInvalidParams(f"{what} must be an encoded NodeId") from None


def _params(params: JSONValue, cls: type[T]) -> T:
    try:
        return structure(params, cls)
    except WireError as exc:
        raise RPCInvalidParams(str(exc)) from None


@attrs.frozen
class SignalRequest:
    """A verified ``nodesConnectionSignalFinal``: punch toward ``address``."""

    source: NodeId
    target: NodeId
    address: NodeAddress


def verify_final(params: JSONValue, signaller: NodeId | None) -> SignalRequest:
    """Check a ``nodesConnectionSignalFinal`` request from ``signaller``
    (the caller's certificate NodeId) as Polykey's target does; raises
    :class:`SignalError` or RPCInvalidParams."""
    p = _params(params, SignalFinalParams)
    if signaller is None:
        raise NodeIdMissingError()
    if not _verify(p.source, p.request_signature, request_data(p.source, p.target)):
        raise RequestVerificationError()
    address = p.address  # as the signaller sent it: the signature covers its JSON
    signed = relay_data(p.source, p.target, address_json(address), p.request_signature)
    if not _verify(signaller, p.relay_signature, signed):
        raise RelayVerificationError()
    try:
        where = structure(address, NodeAddress, at="address")
    except WireError as exc:
        raise RPCInvalidParams(str(exc)) from None
    return SignalRequest(p.source, p.target, where)


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """One token bucket per key (Polykey's: 20 tokens, 10 a second, a bucket
    forgotten 60 s after its last use). At most ``max_keys`` buckets are
    kept; the least recently used goes first. Pure: time is an argument."""

    def __init__(
        self,
        *,
        capacity: float = 20,
        rate: float = 10,
        ttl: float = 60,
        max_keys: int = 10_000,
    ) -> None:
        self.capacity = capacity
        self.rate = rate
        self.ttl = ttl
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, _Bucket] = OrderedDict()
        self.refused = 0

    def consume(self, key: object, now: float) -> bool:
        """Take one token for ``key``; False (and counted) when none is left."""
        self._expire(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.capacity, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1:
            self.refused += 1
            return False
        bucket.tokens -= 1
        return True

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if now - bucket.updated < self.ttl:
                break
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


# -- the handlers ---------------------------------------------------------------------


class SignalConnection(Protocol):
    """What a signaller needs of its connection to the target."""

    @property
    def address(self) -> Address: ...


class SignalHost(Protocol):
    """What the signalling handlers need of the node (its connection
    manager implements it)."""

    @property
    def identity(self) -> NodeIdentity: ...

    def live_connection(self, node_id: NodeId) -> SignalConnection | None:
        """The live connection to ``node_id``, if we hold one."""

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        """Call ``target``'s ``nodesConnectionSignalFinal`` with ``params``,
        fire and forget (bounded, failures swallowed and counted)."""

    def punch(self, request: SignalRequest) -> None:
        """Start punching toward ``request.address`` in the background."""

    def now(self) -> float: ...


def caller_node_id(ctx: CallContext) -> NodeId | None:
    """The caller's NodeId, from its verified certificate."""
    caller = ctx.transport.get("node_id")
    return caller if isinstance(caller, NodeId) else None


class NodesConnectionSignalInitial(UnaryHandler[JSONValue, JSONObject]):
    """The signaller's side (step 2 of the module doc)."""

    def __init__(self, host: SignalHost, limiter: RateLimiter | None = None) -> None:
        self.host = host
        # Not `limiter or ...`: a RateLimiter with no buckets yet is falsy (len 0).
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.forwarded = 0

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONObject:
        p = _params(params, SignalInitialParams)
        source = caller_node_id(ctx)
        if source is None:
            raise NodeIdMissingError()
        target, signature = p.target, p.signature
        if not _verify(source, signature, request_data(source, target)):
            raise RelayVerificationError()  # sic: Polykey's class for this
        connection = self.host.live_connection(target)
        if connection is None:
            raise ConnectionNotFoundError()
        if not self.limiter.consume(source, self.host.now()):
            raise RequestRateExceededError()
        # A's address as we see it, in the form we sign and send it.
        seen = {
            "host": str(ctx.transport.get("host")),
            "port": ctx.transport.get("port"),
        }
        relay_signature = self.host.identity.key_pair.sign(
            relay_data(source, target, address_json(seen), signature)
        )
        final = SignalFinalParams(
            source=source,
            target=target,
            address=JSONMapping(seen),
            request_signature=signature,
            relay_signature=Signature(relay_signature),
        )
        self.host.forward_signal(target, converter.unstructure(final))
        self.forwarded += 1
        host, port = connection.address
        return {"host": host, "port": port}


class NodesConnectionSignalFinal(UnaryHandler[JSONValue, JSONObject]):
    """The target's side (step 3 of the module doc)."""

    def __init__(self, host: SignalHost) -> None:
        self.host = host
        self.punches = 0

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONObject:
        request = verify_final(params, caller_node_id(ctx))
        if request.target != self.host.identity.node_id:
            raise RPCInvalidParams("the signal is for another node")
        self.host.punch(request)
        self.punches += 1
        return {}


async def request_signal(
    client: RPCClient[Any], identity: NodeIdentity, target: NodeId
) -> NodeAddress:
    """Ask the signaller behind ``client`` to signal ``target`` (step 1);
    returns ``target``'s address as the signaller sees it. Raises
    :class:`~polykey.rpc.RPCRemoteError` when it refuses and
    InvalidAddressError when its answer is not an address."""
    signature = identity.key_pair.sign(request_data(identity.node_id, target))
    request = SignalInitialParams(target=target, signature=Signature(signature))
    result = await client.unary(SIGNAL_INITIAL, converter.unstructure(request))
    try:
        return structure(result, NodeAddress, at="answer")
    except WireError as exc:
        raise InvalidAddressError(f"the signaller's {exc}") from None
