"""Hole-punch signalling: the pure checks, then real nodes over QUIC on
loopback (initiator, signaller and target; bad input at each)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import KeyPair, NodeId
from polykey.nodes import (
    SIGNAL_FINAL,
    SIGNAL_INITIAL,
    ConnectionPath,
    InvalidAddressError,
    NodeConnection,
    RelayVerificationError,
    RequestVerificationError,
)
from polykey.nodes._signalling import (
    NodesConnectionSignalInitial,
    RateLimiter,
    address_json,
    b64url_decode,
    b64url_encode,
    relay_data,
    request_data,
    verify_final,
)
from polykey.rpc import RPCInvalidParams, RPCRemoteError

from ..quic.helpers import Gate
from .helpers import Liar, connect_both, wait_for

# -- pure --------------------------------------------------------------------------


@given(st.binary(max_size=96))
def test_b64url_round_trip_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert "+" not in text
    assert "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("bad", ["a+b", "a/b", "ab cd", "a", "a" * 200, 7, None])
def test_b64url_refuses_what_is_not_base64url(bad: object) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(bad)


def test_address_json_is_compact_in_the_order_received() -> None:
    assert address_json({"host": "10.0.0.1", "port": 1314}) == (
        b'{"host":"10.0.0.1","port":1314}'
    )
    assert address_json({"port": 1, "host": "::1"}) == b'{"port":1,"host":"::1"}'


def test_rate_limiter_is_polykeys_token_bucket() -> None:
    limiter = RateLimiter()
    assert all(limiter.consume("a", 0.0) for _ in range(20))
    assert not limiter.consume("a", 0.0)
    assert limiter.consume("b", 0.0)  # per key
    # 10 tokens a second: 0.1 s buys one more.
    assert limiter.consume("a", 0.1)
    assert not limiter.consume("a", 0.1)
    assert limiter.refused == 2
    # Forgotten 60 s after the last use; bounded in keys.
    limiter.consume("c", 0.1)
    assert len(limiter) == 3
    limiter.consume("d", 61.0)
    assert len(limiter) == 1
    small = RateLimiter(max_keys=2)
    for key in range(5):
        small.consume(key, 0.0)
    assert len(small) == 2


class Keys:
    def __init__(self) -> None:
        self.pair = KeyPair.generate()
        self.id = self.pair.node_id


def final_params(
    a: Keys,
    b: Keys,
    s: Keys,
    address: dict[str, Any],
    *,
    signed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    request = a.pair.sign(request_data(a.id, b.id))
    relay = s.pair.sign(
        relay_data(a.id, b.id, address_json(signed or address), request)
    )
    return {
        "sourceNodeIdEncoded": str(a.id),
        "targetNodeIdEncoded": str(b.id),
        "address": address,
        "requestSignature": b64url_encode(request),
        "relaySignature": b64url_encode(relay),
    }


def test_verify_final_accepts_the_real_thing_and_refuses_forgeries() -> None:
    a, b, s, m = Keys(), Keys(), Keys(), Keys()
    address = {"host": "198.51.100.7", "port": 4242}
    request = verify_final(final_params(a, b, s, address), s.id)
    assert (request.source, request.target) == (a.id, b.id)
    assert request.address.as_tuple() == ("198.51.100.7", 4242)
    # An IPv4-mapped host is verified as it was sent, punched as IPv4.
    mapped = {"host": "::ffff:198.51.100.7", "port": 4242}
    assert verify_final(final_params(a, b, s, mapped), s.id).address.host == (
        "198.51.100.7"
    )
    # The relay signature covers the address: another address fails.
    moved = final_params(a, b, s, {"host": "203.0.113.9", "port": 4242}, signed=address)
    with pytest.raises(RelayVerificationError):
        verify_final(moved, s.id)
    # Signed by someone else than the signaller on this connection.
    with pytest.raises(RelayVerificationError):
        verify_final(final_params(a, b, s, address), m.id)
    # A request signature by M, passed off as A's.
    forged = final_params(a, b, s, address)
    forged["requestSignature"] = b64url_encode(m.pair.sign(request_data(a.id, b.id)))
    with pytest.raises(RequestVerificationError):
        verify_final(forged, s.id)
    # A's request for B replayed for another target.
    replayed = final_params(a, b, s, address)
    replayed["targetNodeIdEncoded"] = str(m.id)
    with pytest.raises(RequestVerificationError):
        verify_final(replayed, s.id)
    for key, value in (
        ("address", "1.2.3.4:5"),
        ("requestSignature", "short"),
        ("relaySignature", b64url_encode(b"x" * 63)),
        ("sourceNodeIdEncoded", "vnope"),
    ):
        with pytest.raises(RPCInvalidParams):
            verify_final({**final_params(a, b, s, address), key: value}, s.id)
    # Signatures fine, but nothing to punch to.
    with pytest.raises(RPCInvalidParams, match="address"):
        verify_final(final_params(a, b, s, {"host": "0.0.0.0", "port": 1}), s.id)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ({"host": "198.51.100.7", "port": 10**400},
         "address.port must be a port number (1-65535)"),
        ({"host": "198.51.100.7", "port": "4242"},
         "address.port must be a port number (1-65535)"),
        ({"host": ["198.51.100.7"], "port": 4242}, "address.host must be a string"),
        ({"port": 4242}, "address.host is missing"),
        ({"host": "224.0.0.1", "port": 4242},
         "address.host is not dialable: '224.0.0.1' is not a unicast address"),
    ],
)  # fmt: skip
def test_verify_final_names_the_bad_address_key(
    address: dict[str, Any], message: str
) -> None:
    # Signed as sent, so only the address's shape can fail.
    a, b, s = Keys(), Keys(), Keys()
    with pytest.raises(RPCInvalidParams) as info:
        verify_final(final_params(a, b, s, address), s.id)
    assert str(info.value) == message


# -- real nodes over QUIC on loopback ---------------------------------------------------------


@asynccontextmanager
async def nodes(tmp_path: Path, *names: str) -> AsyncIterator[list[PolykeyNode]]:
    async with trio.open_nursery() as nursery:
        started: list[PolykeyNode] = []
        stop = trio.Event()

        async def run(
            name: str,
            *,
            task_status: trio.TaskStatus[PolykeyNode] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            settings = NodeSettings(state_dir=tmp_path / name, host="127.0.0.1", port=0)
            async with PolykeyNode(settings) as node:
                task_status.started(node)
                await stop.wait()

        for name in names:
            started.append(await nursery.start(run, name))
        yield started
        stop.set()


@asynccontextmanager
async def punch_trio(
    tmp_path: Path,
) -> AsyncIterator[tuple[PolykeyNode, PolykeyNode, PolykeyNode, NodeConnection]]:
    """A requester A, a signaller S and a target B, A and B connected to S:
    ``(a, s, b, a's connection to s)``."""
    async with nodes(tmp_path, "a", "s", "b") as (a, s, b):
        to_s = await a.connect(s.node_id, s.address)
        await connect_both(b, s)
        yield a, s, b, to_s


async def test_a_punch_through_a_signaller_connects_by_the_punched_path(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with punch_trio(tmp_path) as (a, s, b, to_s):
            conn = await a.connections.connect_punched(b.node_id, to_s)
            assert conn.node_id == b.node_id
            assert conn.path is ConnectionPath.PUNCHED
            pong = await conn.rpc.unary("nodesPing", {})
            assert pong["success"] is True
            # B tells A where it sees A: A's reflexive address.
            assert pong["address"] == {"host": "127.0.0.1", "port": a.address[1]}
            # The signaller forwarded, the target punched, and B sees A's
            # connection as the one its punch let in.
            with trio.fail_after(5):
                while b.connections.get(a.node_id) is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert b.connections.get(a.node_id).path is ConnectionPath.PUNCHED  # type: ignore[union-attr]
            assert s.connections.signals_forwarded == 1
            assert b.connections.punches == 1


@pytest.mark.parametrize("moment", ["relayed", "answered"])
async def test_a_dial_started_during_a_punch_waits_for_it(
    tmp_path: Path, moment: str
) -> None:
    """Once the signaller relays, the target's punch opens its NAT to us: a
    plain dial started then (a lookup's, in the NAT lab with a Polykey seed
    or under load) got through the same hole first, a second connection,
    and the one A kept was labelled direct. From the moment the signal is
    asked for, a dial must share the punched attempt."""
    with trio.fail_after(30):
        async with punch_trio(tmp_path) as (a, s, b, to_s):
            manager = a.connections
            initial = s.rpc_server.manifest[SIGNAL_INITIAL]
            dials, punched_dials = manager.dials, manager.punched_dials
            punched: list[Any] = []

            def reached() -> bool:
                if moment == "relayed":  # the answer is not back yet
                    return getattr(initial, "forwarded", 0) > 0
                return manager.punched_dials > punched_dials  # the dial is out

            async with trio.open_nursery() as nursery:

                async def punch() -> None:
                    punched.append(await manager.connect_punched(b.node_id, to_s))

                nursery.start_soon(punch)
                # Each step takes round trips, on this loop, to finish.
                while not reached():
                    await trio.lowlevel.checkpoint()
                assert manager.get(b.node_id) is None
                conn = await manager.connect(b.node_id, b.address)
            assert punched == [conn]
            assert conn.path is ConnectionPath.PUNCHED
            assert manager.dials == dials  # no dial of its own
            assert b.connections.statistics()["server"]["accepted"] == 1  # a's only


def hold_signals(signaller: PolykeyNode, *, before: bool = False) -> trio.Event:
    """The signaller holds each request until the returned event is set:
    after it forwarded the signal and before it answers (the window in which
    the target's NAT is open to the requester, who has no answer yet), or,
    ``before``, before it handles the request at all."""
    initial = signaller.rpc_server.manifest[SIGNAL_INITIAL]
    assert isinstance(initial, NodesConnectionSignalInitial)
    release = trio.Event()
    handle = initial.handle

    async def held(params: Any, ctx: Any) -> Any:
        if before:
            await release.wait()
        answer = await handle(params, ctx)
        await release.wait()
        return answer

    initial.handle = held  # type: ignore[method-assign]
    return release


async def dial_seen_as(
    dialler: PolykeyNode, to: PolykeyNode, path: ConnectionPath
) -> NodeConnection:
    """``dialler`` dials ``to``; ``to``'s side of that connection, once both
    ends hold it by ``path``."""
    conn = await dialler.connections.connect(to.node_id, to.address)
    assert conn.path is path
    await wait_for(lambda: to.connections.get(dialler.node_id) is not None)
    seen = to.connections.get(dialler.node_id)
    assert seen is not None
    assert seen.path is path
    return seen


async def test_a_dial_in_flight_that_gets_in_through_the_punch_is_punched(
    tmp_path: Path,
) -> None:
    """The NAT lab's failure (full cone to port-restricted, labelled
    direct): a plain dial in flight before the punch (a lookup's) re-sends
    its Initial once the target punches, and its handshake finishes while
    the requester still awaits the signaller's answer. It came through the
    punch, and both ends must say so."""
    with trio.fail_after(30):
        async with (
            punch_trio(tmp_path) as (a, s, b, to_s),
            trio.open_nursery() as nursery,
        ):
            manager = a.connections
            # B behind a NAT that drops A's datagrams until B punches.
            nat = Gate(b.address)
            await nursery.start(nat.run)
            plain: list[NodeConnection] = []
            punched: list[NodeConnection] = []

            async def dial() -> None:
                plain.append(await manager.connect(b.node_id, nat.address))

            async def punch() -> None:
                punched.append(await manager.connect_punched(b.node_id, to_s))

            nursery.start_soon(dial)
            await wait_for(lambda: nat.dropped > 0)
            release = hold_signals(s)
            nursery.start_soon(punch)
            await wait_for(lambda: b.connections.punches > 0)
            nat.opened.set()
            # The plain dial's next Initial (its probe timeout, about 1 s).
            await wait_for(lambda: bool(plain))
            assert not punched  # the answer is held still
            assert plain[0].path is ConnectionPath.PUNCHED
            release.set()
            await wait_for(lambda: bool(punched))
            assert punched == plain  # the punch kept the one that got in
            seen = b.connections.get(a.node_id)
            assert seen is not None
            assert seen.path is ConnectionPath.PUNCHED
            nursery.cancel_scope.cancel()


async def test_a_connection_from_the_target_during_the_request_is_punched(
    tmp_path: Path,
) -> None:
    """Either side may dial once the target punches: the target's own dial
    to the requester, arriving while the requester awaits its answer, is
    punched at both ends, as the requester's would be."""
    with trio.fail_after(30):
        async with (
            punch_trio(tmp_path) as (a, s, b, to_s),
            trio.open_nursery() as nursery,
        ):
            release = hold_signals(s)
            punched: list[NodeConnection] = []

            async def punch() -> None:
                punched.append(await a.connections.connect_punched(b.node_id, to_s))

            nursery.start_soon(punch)
            await wait_for(lambda: b.connections.punches > 0)
            seen = await dial_seen_as(b, a, ConnectionPath.PUNCHED)
            release.set()
            await wait_for(lambda: bool(punched))
            assert punched[0].connection is seen.connection


async def test_a_refused_signal_leaves_the_next_dial_direct(tmp_path: Path) -> None:
    """A signaller that refuses forwards nothing, so nothing opens: the
    requester's next dial to the target is direct, as the target sees it."""
    with trio.fail_after(30):
        async with nodes(tmp_path, "a", "s", "b") as (a, s, b):
            to_s = await a.connect(s.node_id, s.address)
            # S holds no connection to B: it refuses.
            with pytest.raises(RPCRemoteError):
                await a.connections.connect_punched(b.node_id, to_s)
            await dial_seen_as(a, b, ConnectionPath.DIRECT)


async def test_a_refusal_leaves_the_mark_of_a_request_to_another_signaller(
    tmp_path: Path,
) -> None:
    """The finder asks several signallers at once. One that refuses after
    another accepted must not unmark the target the other signalled: B
    punches toward A all the same, and a connection between them then is
    punched at both ends."""
    with trio.fail_after(30):
        async with (
            nodes(tmp_path, "a", "s", "b", "r") as (a, s, b, r),
            trio.open_nursery() as nursery,
        ):
            to_s = await a.connect(s.node_id, s.address)
            to_r = await a.connect(r.node_id, r.address)
            await connect_both(b, s)  # R holds no connection to B: it refuses
            refusal = hold_signals(r, before=True)
            answer = hold_signals(s)
            refused: list[BaseException] = []

            async def ask(signaller: NodeConnection) -> None:
                try:
                    await a.connections.connect_punched(b.node_id, signaller)
                except RPCRemoteError as exc:
                    refused.append(exc)

            nursery.start_soon(ask, to_r)  # marks B first
            await wait_for(lambda: a.connections.dials_in_flight > 0)
            nursery.start_soon(ask, to_s)
            await wait_for(lambda: b.connections.punches > 0)
            refusal.set()
            await wait_for(lambda: bool(refused))
            await dial_seen_as(b, a, ConnectionPath.PUNCHED)
            answer.set()


async def test_connect_by_node_id_alone_finds_the_target(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with nodes(tmp_path, "a", "s", "b") as (a, s, b):
            await a.connect(s.node_id, s.address)
            await connect_both(b, s)
            conn = await a.connect(b.node_id)
            assert conn.node_id == b.node_id
            assert a.finder.statistics.connects == 1


async def signal(
    node: PolykeyNode, signaller: PolykeyNode, params: dict[str, Any]
) -> dict[str, Any]:
    conn = await node.connect(signaller.node_id, signaller.address)
    result: dict[str, Any] = await conn.rpc.unary(SIGNAL_INITIAL, params)
    return result


def polykey_error(exc: RPCRemoteError) -> tuple[str, int]:
    return exc.remote_type, exc.remote_code  # type: ignore[return-value]


async def test_the_signaller_refuses_bad_requests_with_polykeys_errors(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with nodes(tmp_path, "a", "s", "b", "m") as (a, s, b, m):
            await connect_both(b, s)
            assert a.identity is not None
            assert m.identity is not None
            good = b64url_encode(
                a.identity.key_pair.sign(request_data(a.node_id, b.node_id))
            )
            # M replays A's signature: the requester is who its certificate
            # says, M, and the signature is not M's.
            with pytest.raises(RPCRemoteError) as info:
                await signal(
                    m, s, {"targetNodeIdEncoded": str(b.node_id), "signature": good}
                )
            assert (
                info.value.remote_type
                == "ErrorNodesConnectionSignalRelayVerificationFailed"
            )
            # A target the signaller holds no connection to.
            absent = KeyPair.generate().node_id
            to_absent = b64url_encode(
                a.identity.key_pair.sign(request_data(a.node_id, absent))
            )
            with pytest.raises(RPCRemoteError) as info:
                await signal(
                    a, s, {"targetNodeIdEncoded": str(absent), "signature": to_absent}
                )
            assert (
                info.value.remote_type == "ErrorNodeConnectionManagerConnectionNotFound"
            )
            # Malformed params.
            with pytest.raises(RPCRemoteError) as info:
                await signal(a, s, {"targetNodeIdEncoded": "vx", "signature": good})
            assert info.value.remote_type == "ErrorRPCInvalidParams"
            # A flood: 20 pass, then the bucket is empty; others still served.
            outcomes: list[str] = []
            flood_started = trio.current_time()
            for _ in range(40):
                try:
                    address = await signal(
                        a, s, {"targetNodeIdEncoded": str(b.node_id), "signature": good}
                    )
                except RPCRemoteError as exc:
                    outcomes.append(exc.remote_type or "")
                else:
                    assert address == {"host": "127.0.0.1", "port": b.address[1]}
                    outcomes.append("ok")
            refused = outcomes.count("ErrorNodeConnectionManagerRequestRateExceeded")
            assert refused + outcomes.count("ok") == 40
            # 20 tokens, 10 more a second: what passes depends on how long
            # the flood took (seconds on a loaded machine).
            took = trio.current_time() - flood_started
            passed_at_most = 20 + math.ceil(10 * took)
            assert 15 <= outcomes.count("ok") <= passed_at_most
            assert refused >= 40 - passed_at_most
            to_b = b64url_encode(
                m.identity.key_pair.sign(request_data(m.node_id, b.node_id))
            )
            await signal(
                m, s, {"targetNodeIdEncoded": str(b.node_id), "signature": to_b}
            )
            # B got at most one punch per address of A (coalesced), and S
            # kept serving throughout.
            assert b.connections.punches <= 2
            assert s.connections.get(b.node_id) is not None


async def test_the_target_refuses_forged_signals(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with nodes(tmp_path, "a", "s", "b") as (a, s, b):
            conn = await s.connect(b.node_id, b.address)
            assert a.identity is not None
            assert s.identity is not None
            ka, ks = Keys(), Keys()
            ka.pair, ka.id = a.identity.key_pair, a.node_id
            ks.pair, ks.id = s.identity.key_pair, s.node_id
            kb = Keys()
            kb.id = b.node_id
            address = {"host": "127.0.0.1", "port": a.address[1]}
            assert (
                await conn.rpc.unary(SIGNAL_FINAL, final_params(ka, kb, ks, address))
                == {}
            )
            moved = final_params(
                ka, kb, ks, {"host": "127.0.0.1", "port": 9}, signed=address
            )
            with pytest.raises(RPCRemoteError) as info:
                await conn.rpc.unary(SIGNAL_FINAL, moved)
            assert (
                info.value.remote_type
                == "ErrorNodesConnectionSignalRelayVerificationFailed"
            )
            # Signed by A as relay, but S is the one calling.
            with pytest.raises(RPCRemoteError) as info:
                await conn.rpc.unary(SIGNAL_FINAL, final_params(ka, kb, ka, address))
            assert (
                info.value.remote_type
                == "ErrorNodesConnectionSignalRelayVerificationFailed"
            )
            assert b.connections.punches == 1


async def test_polykeys_error_shape_on_the_wire(tmp_path: Path) -> None:
    """What a Polykey agent's client rebuilds from: -32006, data.type the
    class, data.data with message, timestamp, description and exitCode."""
    from polykey.rpc import JSONStreamDecoder

    with trio.fail_after(30):
        async with nodes(tmp_path, "a", "s") as (a, s):
            conn = await a.connect(s.node_id, s.address)
            stream = await conn.connection.open_stream()
            await stream.send_all_and_eof(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "method": SIGNAL_INITIAL,
                        "params": {
                            "targetNodeIdEncoded": str(s.node_id),
                            "signature": "A" * 86,
                        },
                        "id": None,
                    }
                ).encode()
            )
            decoder = JSONStreamDecoder()
            values: list[Any] = []
            while data := await stream.receive_some():
                values.extend(decoder.feed(data))
            (reply,) = values
            error = reply["error"]
            assert error["code"] == -32006
            assert (
                error["data"]["type"]
                == "ErrorNodesConnectionSignalRelayVerificationFailed"
            )
            fields = error["data"]["data"]
            assert fields["description"] == "Failed to verify relay message signature"
            assert fields["exitCode"] == 69
            assert fields["timestamp"].endswith("Z")
            assert "Traceback" not in json.dumps(reply)


def test_node_id_of_keys() -> None:
    keys = Keys()
    assert isinstance(keys.id, NodeId)


async def test_a_signallers_bad_answer_is_one_clear_error(tmp_path: Path) -> None:
    liar = Liar()
    target = KeyPair.generate().node_id
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            settings = NodeSettings(
                state_dir=tmp_path / "s", host="127.0.0.1", port=0,
                handlers={SIGNAL_INITIAL: liar},
            )  # fmt: skip
            s = await nursery.start(_run, settings)
            settings = NodeSettings(state_dir=tmp_path / "a", host="127.0.0.1", port=0)
            a = await nursery.start(_run, settings)
            to_s = await a.connect(s.node_id, s.address)
            for answer, message in [
                (None, "answer must be an object"),
                ([["127.0.0.1", 1]], "answer must be an object"),
                ({"host": "127.0.0.1"}, "answer.port is missing"),
                ({"host": 5, "port": 1}, "answer.host must be a string"),
                ({"host": {"host": "127.0.0.1"}, "port": 1}, "answer.host must be a string"),
                ({"host": "127.0.0.1", "port": 10**400},
                 "answer.port must be a port number (1-65535)"),
                ({"host": "0.0.0.0", "port": 1},
                 "answer.host is not dialable: '0.0.0.0' is not a unicast address"),
            ]:  # fmt: skip
                liar.answer = answer
                with pytest.raises(InvalidAddressError) as info:
                    await a.connections.connect_punched(target, to_s)
                assert str(info.value) == f"the signaller's {message}"
            # Both still serve, on the same connection.
            assert (await to_s.rpc.unary("nodesPing", {}))["success"]
            nursery.cancel_scope.cancel()


async def _run(
    settings: NodeSettings,
    *,
    task_status: trio.TaskStatus[PolykeyNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with PolykeyNode(settings) as node:
        task_status.started(node)
        await trio.sleep_forever()
