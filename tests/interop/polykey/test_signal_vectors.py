"""Hole-punch signalling against Polykey 1.15.1's own handlers and crypto.

signal_vectors.mjs (see its header) runs Polykey's real SignalInitial and
SignalFinal handlers, its verify and its RPCClient in one Node process. The
module fixture computes everything our side produces first (signatures,
request texts as our RPCClient writes them, our server's replies, forgeries),
runs the script once with all of it, and the tests compare both ways:

1. Polykey accepts what we produce;
2. we accept what Polykey produces (its exact wire text);
3. both refuse the same forgeries, with the same error classes;
4. our error replies decode in Polykey's caller as its own do.

Keys come from fixed seeds, so Polykey's and our signatures must be
byte-identical (Ed25519 is deterministic).
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

from polykey.keys import KeyPair, NodeId, NodeIdentity
from polykey.nodes import (
    SIGNAL_FINAL,
    SIGNAL_INITIAL,
    ConnectionNotFoundError,
    NodeAddress,
    NodeIdMissingError,
    NodesConnectionSignalFinal,
    NodesConnectionSignalInitial,
    RelayVerificationError,
    RequestRateExceededError,
    RequestVerificationError,
    SignalError,
    SignalRequest,
    request_signal,
)
from polykey.nodes._signalling import (
    RateLimiter,
    address_json,
    b64url_decode,
    b64url_encode,
    relay_data,
    request_data,
    verify_final,
)
from polykey.rpc import JSONObject, RPCClient, RPCServer, memory_stream_pair

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "signal_vectors.mjs"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (HERE / "node_modules" / "polykey").is_dir(),
        reason="polykey from npm is not installed (make test installs it)",
    ),
]

SEEDS = {
    "source": bytes([0x11]) * 32,
    "signaller": bytes([0x22]) * 32,
    "target": bytes([0x33]) * 32,
    "mallory": bytes([0x44]) * 32,
}
KEYS = {name: KeyPair.from_seed(seed) for name, seed in SEEDS.items()}
ID = {name: pair.node_id for name, pair in KEYS.items()}
SOURCE, SIGNALLER, TARGET, MALLORY = (
    ID["source"],
    ID["signaller"],
    ID["target"],
    ID["mallory"],
)
# The initiator as a Polykey signaller's dual-stack socket sees it (raw, not
# canonical: that is what Polykey signs and sends), and plain.
MAPPED = {"host": "::ffff:127.0.0.1", "port": 40000}
PLAIN = {"host": "127.0.0.1", "port": 40000}
# The signaller's connection to the target (the script's default).
TARGET_ADDRESS: dict[str, Any] = {"host": "127.0.0.1", "port": 55555}
# Polykey's caller timeout (15 s) and ours, as both put it in params.metadata.
RPC_TIMEOUT = 15.0
# Every trio part of the fixture or a test is bounded by this.
TRIO_DEADLINE = 20.0
SCRIPT_TIMEOUT = 60.0

AGENT_ERRORS = "ErrorNodesConnectionSignal{}VerificationFailed"
RELAY_FAILED = AGENT_ERRORS.format("Relay")
REQUEST_FAILED = AGENT_ERRORS.format("Request")


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def final_params(
    address: Mapping[str, Any],
    *,
    signed: Mapping[str, Any] | None = None,
    request_signer: str = "source",
    relay_signer: str = "signaller",
) -> dict[str, Any]:
    """SignalFinal params for source -> target built with our functions; the
    relay signature is over ``signed`` (default: the address sent)."""
    request = KEYS[request_signer].sign(request_data(SOURCE, TARGET))
    relay = KEYS[relay_signer].sign(
        relay_data(SOURCE, TARGET, address_json(signed or address), request)
    )
    return {
        "sourceNodeIdEncoded": str(SOURCE),
        "targetNodeIdEncoded": str(TARGET),
        "address": dict(address),
        "requestSignature": b64url_encode(request),
        "relaySignature": b64url_encode(relay),
    }


def _replayed() -> dict[str, Any]:
    params = final_params(PLAIN)
    params["targetNodeIdEncoded"] = str(MALLORY)
    return params


def _reordered() -> dict[str, Any]:
    # Signed as {"host","port"}, sent as {"port","host"}: the relay signature
    # covers the address JSON in the order it arrives.
    params = final_params(PLAIN)
    params["address"] = {"port": PLAIN["port"], "host": PLAIN["host"]}
    return params


@attrs.frozen
class Forgery:
    params: dict[str, Any]
    error: type[SignalError]
    polykey_type: str
    # The node Polykey's handler runs as (a replay goes to the other target).
    target: str = "target"


FORGERIES: dict[str, Forgery] = {
    "relay over another address": Forgery(
        final_params(PLAIN, signed={"host": "127.0.0.2", "port": 40000}),
        RelayVerificationError,
        RELAY_FAILED,
    ),
    "relay over ::ffff: form, sent plain": Forgery(
        final_params(PLAIN, signed=MAPPED), RelayVerificationError, RELAY_FAILED
    ),
    "relay over plain form, sent ::ffff:": Forgery(
        final_params(MAPPED, signed=PLAIN), RelayVerificationError, RELAY_FAILED
    ),
    "address keys reordered": Forgery(
        _reordered(), RelayVerificationError, RELAY_FAILED
    ),
    "relay signed by another key": Forgery(
        final_params(PLAIN, relay_signer="mallory"),
        RelayVerificationError,
        RELAY_FAILED,
    ),
    "request signed by another key": Forgery(
        final_params(PLAIN, request_signer="mallory"),
        RequestVerificationError,
        REQUEST_FAILED,
    ),
    "request replayed for another target": Forgery(
        _replayed(), RequestVerificationError, REQUEST_FAILED, target="mallory"
    ),
}


# -- our side, over in-memory streams --------------------------------------------


@attrs.frozen
class _Connection:
    address: tuple[str, int]


@attrs.define
class StubHost:
    """A SignalHost that records instead of touching the network."""

    identity: NodeIdentity
    connected: dict[NodeId, tuple[str, int]] = attrs.field(factory=dict)
    forwarded: list[tuple[NodeId, JSONObject]] = attrs.field(factory=list)
    punched: list[SignalRequest] = attrs.field(factory=list)

    def live_connection(self, node_id: NodeId) -> _Connection | None:
        address = self.connected.get(node_id)
        return None if address is None else _Connection(address)

    def forward_signal(self, target: NodeId, params: JSONObject) -> None:
        self.forwarded.append((target, params))

    def punch(self, request: SignalRequest) -> None:
        self.punched.append(request)

    def now(self) -> float:
        return 0.0


def signaller_host(*, connected: bool = True) -> StubHost:
    host = StubHost(NodeIdentity.generate(KEYS["signaller"]))
    if connected:
        host.connected[TARGET] = (TARGET_ADDRESS["host"], TARGET_ADDRESS["port"])
    return host


def target_host() -> StubHost:
    return StubHost(NodeIdentity.generate(KEYS["target"]))


def _complete(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


async def _read_message(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not _complete(data):
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended inside a message: {data!r}")
        data += chunk
    return data


async def serve(
    handler: NodesConnectionSignalInitial | NodesConnectionSignalFinal,
    method: str,
    request: bytes,
    transport: Mapping[str, Any],
) -> bytes:
    """Our RPCServer with ``handler`` answers ``request`` (bytes as a caller
    writes them); returns the reply bytes. Like Polykey's unary caller, the
    reply is read before our side's FIN."""
    with trio.fail_after(TRIO_DEADLINE):
        async with RPCServer({method: handler}, timeout=RPC_TIMEOUT) as server:
            ours, theirs = memory_stream_pair()
            await server.handle_stream(theirs, transport)
            await ours.send_all(request)
            reply = await _read_message(ours)
            await ours.send_eof()
            while await ours.receive_some():
                pass
            return reply


T = TypeVar("T")


async def capture_request(
    call: Callable[[RPCClient[Any]], Awaitable[T]], reply: bytes
) -> tuple[bytes, T]:
    """Run ``call`` on our RPCClient (as a node's connection configures it)
    against a peer that answers ``reply``; returns the exact request bytes
    our client wrote and the call's result."""
    written: list[bytes] = []
    with trio.fail_after(TRIO_DEADLINE):
        async with trio.open_nursery() as nursery:

            async def peer(stream: trio.abc.HalfCloseableStream) -> None:
                written.append(await _read_message(stream))
                await stream.send_all(reply)
                await stream.send_eof()
                while await stream.receive_some():
                    pass

            async def factory() -> trio.abc.HalfCloseableStream:
                ours, theirs = memory_stream_pair()
                nursery.start_soon(peer, theirs)
                return ours

            result = await call(RPCClient(None, factory, timeout=RPC_TIMEOUT))
    return written[0], result


def transport(node_id: NodeId | None, address: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"host": address["host"], "port": address["port"]}
    if node_id is not None:
        meta["node_id"] = node_id
    return meta


def request_text(method: str, params: Any) -> bytes:
    return compact({"jsonrpc": "2.0", "method": method, "params": params}).encode()


def initial_params(signer: str = "source", target: NodeId = TARGET) -> JSONObject:
    signature = KEYS[signer].sign(request_data(SOURCE, target))
    return {"targetNodeIdEncoded": str(target), "signature": b64url_encode(signature)}


@attrs.define
class Ours:
    """What our implementation produced, before the script runs."""

    initial_wire: bytes = b""
    final_wire: bytes = b""
    forwarded: JSONObject = attrs.field(factory=dict)
    initial_reply: bytes = b""
    final_reply: bytes = b""
    # Our server's error reply per failure (see ERROR_CASES).
    errors: dict[str, bytes] = attrs.field(factory=dict)


_OK_REPLY = compact({"jsonrpc": "2.0", "result": TARGET_ADDRESS, "id": None}).encode()


async def produce_ours() -> Ours:
    ours = Ours()
    identity = NodeIdentity.generate(KEYS["source"])
    # The initiator: request_signal, as connect_punched calls it.
    ours.initial_wire, _ = await capture_request(
        lambda client: request_signal(client, identity, TARGET), _OK_REPLY
    )
    # Our signaller's handler on that request; the initiator seen in raw
    # mapped form, as a Polykey signaller sees it in the flow below.
    signaller = signaller_host()
    ours.initial_reply = await serve(
        NodesConnectionSignalInitial(signaller),
        SIGNAL_INITIAL,
        ours.initial_wire,
        transport(SOURCE, MAPPED),
    )
    [(to, forwarded)] = signaller.forwarded
    assert to == TARGET
    ours.forwarded = forwarded
    # ... and the relay as our client writes it to the target.
    ours.final_wire, _ = await capture_request(
        lambda client: client.unary(SIGNAL_FINAL, forwarded),
        b'{"jsonrpc":"2.0","result":{},"id":null}',
    )
    ours.final_reply = await serve(
        NodesConnectionSignalFinal(target_host()),
        SIGNAL_FINAL,
        ours.final_wire,
        transport(SIGNALLER, TARGET_ADDRESS),
    )
    # Our error replies.
    final = NodesConnectionSignalFinal(target_host())
    for name, forgery in (
        ("relay verification", FORGERIES["relay over another address"]),
        ("request verification", FORGERIES["request signed by another key"]),
    ):
        ours.errors[name] = await serve(
            final,
            SIGNAL_FINAL,
            request_text(SIGNAL_FINAL, forgery.params),
            transport(SIGNALLER, TARGET_ADDRESS),
        )
    ours.errors["node id missing"] = await serve(
        final,
        SIGNAL_FINAL,
        request_text(SIGNAL_FINAL, final_params(PLAIN)),
        transport(None, TARGET_ADDRESS),
    )
    for name, host, limiter, params in (
        ("bad request signature", signaller_host(), None, initial_params("mallory")),
        (
            "target not connected",
            signaller_host(connected=False),
            None,
            initial_params(),
        ),
        (
            "rate exceeded",
            signaller_host(),
            RateLimiter(capacity=0),  # a new bucket starts empty: refused at once
            initial_params(),
        ),
    ):
        ours.errors[name] = await serve(
            NodesConnectionSignalInitial(host, limiter),
            SIGNAL_INITIAL,
            request_text(SIGNAL_INITIAL, params),
            transport(SOURCE, PLAIN),
        )
    return ours


# -- the one script run ---------------------------------------------------------------


@attrs.frozen
class ErrorCase:
    """One failure: our reply, and the check that makes Polykey's own."""

    method: str
    error: type[SignalError]
    # The script check whose reply is Polykey's own error for it.
    polykey_check: str


ERROR_CASES = {
    "relay verification": ErrorCase(
        SIGNAL_FINAL, RelayVerificationError, "forgery: relay over another address"
    ),
    "request verification": ErrorCase(
        SIGNAL_FINAL,
        RequestVerificationError,
        "forgery: request signed by another key",
    ),
    "node id missing": ErrorCase(SIGNAL_FINAL, NodeIdMissingError, "final no certs"),
    "bad request signature": ErrorCase(
        SIGNAL_INITIAL, RelayVerificationError, "initial by another key"
    ),
    "target not connected": ErrorCase(
        SIGNAL_INITIAL, ConnectionNotFoundError, "initial not connected"
    ),
    "rate exceeded": ErrorCase(
        SIGNAL_INITIAL, RequestRateExceededError, "initial rate limited"
    ),
}


def _params_json(wire: bytes) -> str:
    return compact(json.loads(wire)["params"])


def build_checks(ours: Ours) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}

    def final(name: str, params_json: str, **extra: Any) -> None:
        checks[name] = {"kind": "signalFinal", "peer": "signaller"}
        checks[name].update(paramsJson=params_json, **extra)

    request = KEYS["source"].sign(request_data(SOURCE, TARGET))
    checks["verify our request"] = {
        "kind": "verify",
        "nodeId": str(SOURCE),
        "dataHex": request_data(SOURCE, TARGET).hex(),
        "signature": b64url_encode(request),
    }
    for form, address in (("plain", PLAIN), ("mapped", MAPPED)):
        data = relay_data(SOURCE, TARGET, address_json(address), request)
        checks[f"verify our relay {form}"] = {
            "kind": "verify",
            "nodeId": str(SIGNALLER),
            "dataHex": data.hex(),
            "signature": b64url_encode(KEYS["signaller"].sign(data)),
        }
        final(f"final ours {form}", compact(final_params(address)))
    final("final our wire", _params_json(ours.final_wire))
    checks["initial our wire"] = {
        "kind": "signalInitial",
        "peer": "source",
        "paramsJson": _params_json(ours.initial_wire),
        "remote": MAPPED,
    }
    for name, forgery in FORGERIES.items():
        final(f"forgery: {name}", compact(forgery.params), target=forgery.target)
    final("final no certs", compact(final_params(PLAIN)), peerCerts=False)
    checks["initial by another key"] = {
        "kind": "signalInitial",
        "peer": "source",
        "params": initial_params("mallory"),
    }
    checks["initial replayed for another target"] = {
        "kind": "signalInitial",
        "peer": "source",
        "params": {**initial_params(), "targetNodeIdEncoded": str(MALLORY)},
        "target": "mallory",
    }
    checks["initial not connected"] = {
        "kind": "signalInitial",
        "peer": "source",
        "params": initial_params(),
        "targetConnected": False,
    }
    # Polykey's bucket holds 20: the 21st request is refused.
    checks["initial rate limited"] = {
        "kind": "signalInitial",
        "peer": "source",
        "params": initial_params(),
        "repeat": 21,
    }
    # Our replies, decoded by Polykey's real RPCClient.
    replies = [
        ("initial reply", SIGNAL_INITIAL, ours.initial_reply),
        ("final reply", SIGNAL_FINAL, ours.final_reply),
    ]
    for name, case in ERROR_CASES.items():
        replies.append((f"error: {name}", case.method, ours.errors[name]))
    for name, method, reply in replies:
        checks[f"client gets our {name}"] = {
            "kind": "clientCall",
            "method": method,
            "params": {},
            "replyJson": reply.decode(),
        }
    return checks


@attrs.frozen
class Vectors:
    ours: Ours
    out: dict[str, Any]
    checks: dict[str, dict[str, Any]]

    @property
    def flow(self) -> dict[str, Any]:
        flow: dict[str, Any] = self.out["flow"]
        return flow


@pytest.fixture(scope="module")
def vectors() -> Vectors:
    ours = trio.run(produce_ours)
    checks = build_checks(ours)
    stdin = {
        "keys": {name: seed.hex() for name, seed in SEEDS.items()},
        "address": MAPPED,
        "targetAddress": TARGET_ADDRESS,
        "checks": list(checks.values()),
    }
    result = subprocess.run(
        ["node", str(SCRIPT)],
        input=json.dumps(stdin),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
        cwd=HERE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert len(out["checks"]) == len(checks)
    return Vectors(ours, out, dict(zip(checks, out["checks"], strict=True)))


# -- the keys --------------------------------------------------------------------------


def test_same_keys_from_the_same_seeds(vectors: Vectors) -> None:
    for name, node_id in ID.items():
        assert vectors.out["nodeIds"][name] == str(node_id)
        assert vectors.out["publicKeys"][name] == node_id.raw.hex()


def test_signatures_are_byte_identical(vectors: Vectors) -> None:
    request = vectors.flow["request"]
    assert request["signedHex"] == request_data(SOURCE, TARGET).hex()
    ours = KEYS["source"].sign(request_data(SOURCE, TARGET))
    assert request["signatureHex"] == ours.hex()
    assert request["signature"] == b64url_encode(ours)
    relay = vectors.flow["relay"]
    assert relay["addressJson"].encode() == address_json(MAPPED)
    signed = relay_data(SOURCE, TARGET, address_json(MAPPED), ours)
    assert relay["signedHex"] == signed.hex()
    assert relay["signatureHex"] == KEYS["signaller"].sign(signed).hex()
    assert relay["signature"] == b64url_encode(bytes.fromhex(relay["signatureHex"]))
    assert b64url_decode(relay["signature"]) == bytes.fromhex(relay["signatureHex"])


# -- 1. Polykey accepts what we produce ---------------------------------------


@pytest.mark.parametrize(
    "check", ["verify our request", "verify our relay plain", "verify our relay mapped"]
)
def test_polykey_verifies_our_signatures(vectors: Vectors, check: str) -> None:
    assert vectors.checks[check] == {"kind": "verify", "valid": True}


@pytest.mark.parametrize(
    ("check", "punched"),
    [
        ("final ours plain", PLAIN),
        ("final ours mapped", MAPPED),
        # Our own signaller's relay (mapped host, as it saw the initiator),
        # as our client writes it, params.metadata included.
        ("final our wire", MAPPED),
    ],
)
def test_polykeys_signal_final_accepts_our_relay(
    vectors: Vectors, check: str, punched: dict[str, Any]
) -> None:
    result = vectors.checks[check]
    assert result["ok"], result["reply"]
    assert result["reply"] == {}
    # It punches the address exactly as sent.
    assert result["punches"] == [punched]


def test_polykeys_signal_initial_accepts_our_request(vectors: Vectors) -> None:
    # As a node's connection writes it (rpc_timeout 15 s), as Polykey's does:
    # whole milliseconds left before the call's deadline, so a busy machine
    # may have spent a few of them before the request was written.
    metadata = json.loads(vectors.ours.initial_wire)["params"]["metadata"]
    assert list(metadata) == ["timeout"]
    assert type(metadata["timeout"]) is int
    assert 14_500 <= metadata["timeout"] <= 15_000
    result = vectors.checks["initial our wire"]
    assert result["ok"], result["reply"]
    assert result["reply"] == TARGET_ADDRESS
    # Polykey's signaller relayed it, and its target took it.
    [relayed] = result["relayedWire"]
    params = json.loads(relayed)["params"]
    assert params["address"] == MAPPED
    assert result["relaySettled"] == [{"status": "fulfilled"}]
    assert result["punches"] == [MAPPED]
    # Polykey's relay of our request passes our check too.
    assert verify_final(params, SIGNALLER) == SignalRequest(
        SOURCE, TARGET, NodeAddress("127.0.0.1", 40000)
    )


def test_polykeys_client_takes_our_replies(vectors: Vectors) -> None:
    initial = vectors.checks["client gets our initial reply"]
    assert initial["ok"], initial
    assert initial["result"] == TARGET_ADDRESS
    final = vectors.checks["client gets our final reply"]
    assert final["ok"], final
    assert final["result"] == {}


# -- 2. we accept what Polykey produces ---------------------------------------


def _wire_params(wire: str) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(wire)["params"]
    return params


def test_polykeys_wire_text_is_what_the_notes_say(vectors: Vectors) -> None:
    flow = vectors.flow
    assert "initiatorError" not in flow
    assert flow["relaySettled"] == [{"status": "fulfilled"}]
    final = json.loads(flow["signalFinalWire"])
    assert list(final) == ["method", "jsonrpc", "id", "params"]
    assert final["params"]["address"] == MAPPED
    assert final["params"]["metadata"] == {"timeout": None}
    assert '"metadata":{"timeout":null}' in flow["signalFinalWire"]
    initial = _wire_params(flow["signalInitialWire"])
    assert initial["metadata"] == {"timeout": 15000}
    # Polykey's initiator dialled where its signaller pointed it.
    assert flow["dial"] == {"nodeIds": [str(TARGET)], **TARGET_ADDRESS}


def test_we_verify_polykeys_signal_final(vectors: Vectors) -> None:
    params = _wire_params(vectors.flow["signalFinalWire"])
    request = verify_final(params, SIGNALLER)
    # The raw mapped host is verified as sent and punched as IPv4.
    assert request == SignalRequest(SOURCE, TARGET, NodeAddress("127.0.0.1", 40000))
    with pytest.raises(RelayVerificationError):
        verify_final(params, MALLORY)


async def test_our_target_serves_polykeys_exact_bytes(vectors: Vectors) -> None:
    host = target_host()
    reply = await serve(
        NodesConnectionSignalFinal(host),
        SIGNAL_FINAL,
        vectors.flow["signalFinalWire"].encode(),
        transport(SIGNALLER, TARGET_ADDRESS),
    )
    # {} and nothing else: an error reply would crash a Polykey signaller.
    assert json.loads(reply) == {"jsonrpc": "2.0", "result": {}, "id": None}
    assert host.punched == [
        SignalRequest(SOURCE, TARGET, NodeAddress("127.0.0.1", 40000))
    ]


async def test_our_signaller_serves_polykeys_request_and_signs_alike(
    vectors: Vectors,
) -> None:
    host = signaller_host()
    reply = await serve(
        NodesConnectionSignalInitial(host),
        SIGNAL_INITIAL,
        vectors.flow["signalInitialWire"].encode(),
        transport(SOURCE, MAPPED),
    )
    assert json.loads(reply) == json.loads(vectors.flow["signalInitialReply"])
    # Our relay, for the initiator seen at the same raw address, is Polykey's
    # relay byte for byte (key order and signatures), less the metadata its
    # client adds.
    [(_, forwarded)] = host.forwarded
    theirs = _wire_params(vectors.flow["signalFinalWire"])
    del theirs["metadata"]
    assert compact(forwarded) == compact(theirs)


async def test_request_signal_reads_polykeys_reply(vectors: Vectors) -> None:
    identity = NodeIdentity.generate(KEYS["source"])
    _, address = await capture_request(
        lambda client: request_signal(client, identity, TARGET),
        vectors.flow["signalInitialReply"].encode(),
    )
    assert address == NodeAddress("127.0.0.1", 55555)


# -- 3. both refuse the same forgeries ----------------------------------------


@pytest.mark.parametrize("name", list(FORGERIES))
def test_both_refuse_the_forgery(vectors: Vectors, name: str) -> None:
    forgery = FORGERIES[name]
    result = vectors.checks[f"forgery: {name}"]
    assert not result["ok"], result
    assert result["reply"]["type"] == forgery.polykey_type
    assert result["punches"] == []
    assert forgery.error.wire_type == forgery.polykey_type
    # Parsed from the text as sent, so key order is kept.
    params = json.loads(compact(forgery.params))
    with pytest.raises(forgery.error):
        verify_final(params, SIGNALLER)


@pytest.mark.parametrize(
    ("check", "params"),
    [
        ("initial by another key", initial_params("mallory")),
        (
            "initial replayed for another target",
            {**initial_params(), "targetNodeIdEncoded": str(MALLORY)},
        ),
    ],
)
async def test_both_signallers_refuse_a_bad_request_signature(
    vectors: Vectors, check: str, params: JSONObject
) -> None:
    result = vectors.checks[check]
    assert not result["ok"], result
    # Polykey's class for it is the *relay* one (sic); ours matches.
    assert result["reply"]["type"] == RELAY_FAILED
    assert result["relayed"] == []
    host = signaller_host()
    host.connected[MALLORY] = ("127.0.0.1", 55556)
    reply = json.loads(
        await serve(
            NodesConnectionSignalInitial(host),
            SIGNAL_INITIAL,
            request_text(SIGNAL_INITIAL, params),
            transport(SOURCE, PLAIN),
        )
    )
    assert reply["error"]["data"]["type"] == RELAY_FAILED
    assert host.forwarded == []


# -- 4. error shape ------------------------------------------------------------------


def _normalised(seen: Any) -> Any:
    """What a Polykey caller got, less what differs by nature: the stack and
    timestamp of a raw error object (checked apart)."""
    if isinstance(seen, dict) and seen.get("thrownPlainObject"):
        value = json.loads(json.dumps(seen["value"]))
        data = value["data"]
        for key in ("stack", "timestamp"):
            assert isinstance(data.pop(key), str), key
        return {**seen, "value": value}
    return seen


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_our_error_decodes_in_polykeys_caller_as_its_own(
    vectors: Vectors, name: str
) -> None:
    case = ERROR_CASES[name]
    ours_wire = json.loads(vectors.ours.errors[name])
    ours = vectors.checks[f"client gets our error: {name}"]
    assert not ours["ok"], ours
    polykey_result = vectors.checks[case.polykey_check]
    if case.polykey_check == "initial rate limited":
        assert polykey_result["okCount"] == 20
        assert polykey_result["firstFailure"] == 20
        polykey = polykey_result["failure"]
    else:
        assert not polykey_result["ok"], polykey_result
        polykey = polykey_result["reply"]
    assert polykey["type"] == case.error.wire_type
    # The envelope and data carry the same members.
    theirs_wire = json.loads(polykey["wire"])
    assert set(ours_wire) == set(theirs_wire)
    assert {k: v for k, v in ours_wire["error"].items() if k != "data"} == {
        k: v for k, v in theirs_wire["error"].items() if k != "data"
    }
    ours_data, theirs_data = ours_wire["error"]["data"], theirs_wire["error"]["data"]
    assert ours_data["type"] == theirs_data["type"]
    assert set(ours_data["data"]) == set(theirs_data["data"])
    for key in ("message", "data", "description", "exitCode"):
        assert ours_data["data"][key] == theirs_data["data"][key], key
    datetime.datetime.fromisoformat(ours_data["data"]["timestamp"])
    # And Polykey's caller makes the same of both.
    assert _normalised(ours["clientSees"]) == _normalised(polykey["clientSees"])
