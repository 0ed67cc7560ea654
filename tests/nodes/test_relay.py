"""Relayed connections: the relay's tables (pure), then real nodes over QUIC
on loopback (a circuit end to end, limits and refusals, the upgrade)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from polykey.agent import NodeSettings, PolykeyNode
from polykey.keys import KeyPair, NodeId
from polykey.nodes import (
    RELAY_CONNECT,
    RELAY_RESERVE,
    RELAY_STOP,
    Circuit,
    ConnectionPath,
    NodeConnection,
    NoReservationError,
    PermissionDeniedError,
    RelayLimits,
    RelayMalformedError,
    RelayTable,
    ResourceLimitError,
)
from polykey.nodes import _punching as punching_module
from polykey.rpc import (
    CallContext,
    JSONValue,
    RawCall,
    RawHandler,
    RPCRemoteError,
    RPCStreamReset,
    StreamCode,
)

from .helpers import Liar, connect_both

# -- pure --------------------------------------------------------------------------


def ids(n: int) -> list[KeyPair]:
    return [KeyPair.generate() for _ in range(n)]


def test_reservations_are_bounded_and_expire() -> None:
    a, b, c = (k.node_id for k in ids(3))
    table = RelayTable(RelayLimits(max_reservations=2, max_reservations_per_ip=1))
    assert table.reserve(a, "10.0.0.1", 0.0) == 3600.0
    with pytest.raises(ResourceLimitError):
        table.reserve(b, "10.0.0.1", 0.0)  # same IP
    table.reserve(b, "10.0.0.2", 0.0)
    with pytest.raises(ResourceLimitError):
        table.reserve(c, "10.0.0.3", 0.0)  # full
    assert table.reserve(a, "10.0.0.1", 10.0) == 3610.0  # renewal is no new one
    assert table.has_reservation(a, 3000.0)
    assert not table.has_reservation(b, 3600.0)
    table.expire(3700.0)
    table.reserve(c, "10.0.0.3", 3700.0)
    assert table.statistics.reservations_refused == 2


def test_circuits_need_a_reservation_and_stay_within_limits() -> None:
    a, b, c = (k.node_id for k in ids(3))
    table = RelayTable(RelayLimits(max_circuits_per_node=2, max_circuits=3))
    with pytest.raises(NoReservationError):
        table.open(a, b, 0.0)
    table.reserve(b, "10.0.0.2", 0.0)
    with pytest.raises(PermissionDeniedError):
        table.open(b, b, 0.0)
    first = table.open(a, b, 0.0)
    table.open(c, b, 0.0)
    with pytest.raises(ResourceLimitError):
        table.open(a, b, 0.0)  # b has 2 circuits
    assert table.statistics.circuits == 2
    assert first.source_id != first.target_id
    # Datagrams are swapped onto the other end's id.
    assert table.route(a, first.source_id, 100, 1.0) == (b, first.target_id)
    assert table.route(b, first.target_id, 50, 1.0) == (a, first.source_id)
    assert table.route(a, b"\x00" * 8, 1, 1.0) is None  # unknown: dropped
    assert table.statistics.datagrams_dropped == 1
    assert (first.to_target, first.to_source) == (100, 50)


def test_a_circuit_ends_past_its_budget_or_duration() -> None:
    a, b = (k.node_id for k in ids(2))
    table = RelayTable(RelayLimits(circuit_bytes=1000, circuit_duration=60.0))
    table.reserve(b, "10.0.0.2", 0.0)
    circuit = table.open(a, b, 0.0)
    assert table.route(a, circuit.source_id, 900, 1.0) == (b, circuit.target_id)
    assert table.route(a, circuit.source_id, 200, 1.0) is circuit  # over budget
    assert circuit.closed
    assert table.route(a, circuit.source_id, 1, 1.0) is None
    again = table.open(a, b, 2.0)
    assert table.route(b, again.target_id, 1, 62.0) is again  # too old
    assert table.statistics.circuits == 0
    assert table.statistics.circuits_over_budget == 1
    assert table.statistics.circuits_expired == 1


def test_what_a_fast_path_forwarded_is_accounted_and_bounded() -> None:
    a, b = (k.node_id for k in ids(2))
    closed: list[Circuit] = []
    table = RelayTable(
        RelayLimits(circuit_bytes=1000, circuit_duration=60.0), on_close=closed.append
    )
    table.reserve(b, "10.0.0.2", 0.0)
    circuit = table.open(a, b, 0.0)
    assert table.budget_left(circuit, a) == table.budget_left(circuit, b) == 1000
    assert table.account(circuit, a, 3, 700, 1, 1.0)
    assert (circuit.to_target, circuit.to_source) == (700, 0)
    assert table.budget_left(circuit, a) == 300
    assert table.budget_left(circuit, b) == 1000
    stats = table.statistics
    assert (stats.datagrams_forwarded, stats.bytes_forwarded) == (3, 700)
    assert stats.datagrams_dropped == 1
    # The slow path agrees: what is left is what route() lets through.
    assert table.route(a, circuit.source_id, 300, 2.0) == (b, circuit.target_id)
    assert table.budget_left(circuit, a) == 0
    assert not closed
    # Past its duration, the next batch accounted closes it.
    assert not table.account(circuit, b, 1, 10, 0, 60.0)
    assert circuit.closed
    assert closed == [circuit]
    assert stats.circuits_expired == 1
    # However a circuit closes, on_close hears it once.
    again = table.open(a, b, 61.0)
    table.drop_node(b)
    table.close(again)
    assert closed == [circuit, again]


def test_a_node_gone_takes_its_circuits() -> None:
    a, b, c = (k.node_id for k in ids(3))
    table = RelayTable()
    table.reserve(b, "10.0.0.2", 0.0)
    table.reserve(c, "10.0.0.3", 0.0)
    one, two = table.open(a, b, 0.0), table.open(a, c, 0.0)
    closed = table.drop_node(b)
    assert closed == [one]
    assert not two.closed
    assert not table.has_reservation(b, 0.0)


# -- real nodes over QUIC on loopback ------------------------------------------------


@asynccontextmanager
async def nodes(
    tmp_path: Path, *specs: tuple[str, dict[str, object]]
) -> AsyncIterator[list[PolykeyNode]]:
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        async def run(
            name: str,
            extra: dict[str, Any],
            *,
            task_status: trio.TaskStatus[PolykeyNode] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            settings = NodeSettings(
                state_dir=tmp_path / name, host="127.0.0.1", port=0, **extra
            )
            async with PolykeyNode(settings) as node:
                task_status.started(node)
                await stop.wait()

        started = [await nursery.start(run, name, extra) for name, extra in specs]
        yield started
        stop.set()


async def a_circuit(a: PolykeyNode, r: PolykeyNode, b: PolykeyNode) -> NodeConnection:
    to_r = await a.connect(r.node_id, r.address)
    b_to_r = await b.connect(r.node_id, r.address)
    assert await b.connections.reserve(b_to_r) is not None
    return await a.connections.connect_relayed(b.node_id, to_r)


async def test_a_relayed_connection_is_end_to_end(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with nodes(
            tmp_path,
            ("a", {}),
            ("r", {"relay": "on"}),
            ("b", {"handlers": {"sha256": Sha256()}}),
        ) as (a, r, b):
            table = r.connections.relay_table
            assert table is not None
            slow = 0
            route = table.route

            def counted(*args: Any) -> Any:
                nonlocal slow
                slow += 1
                return route(*args)

            table.route = counted  # type: ignore[method-assign,assignment]
            conn = await a_circuit(a, r, b)
            assert conn.path is ConnectionPath.RELAYED
            assert conn.connection.peer_identity == b.node_id  # verified end to end
            # Inner packets as big as both of R's connections carry with the
            # circuit id (1350-byte outer packets): more than QUIC's minimum.
            path = conn.connection.statistics().path
            assert path is not None
            assert path.pmtu > 1250
            pong = await conn.rpc.unary("nodesPing", {})
            assert pong["success"] is True
            # B sees A's connection as relayed; R forwarded, and holds one
            # circuit between them.
            with trio.fail_after(5):
                while b.connections.get(a.node_id) is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert b.connections.get(a.node_id).path is ConnectionPath.RELAYED  # type: ignore[union-attr]
            table = r.connections.relay_table
            assert table is not None
            assert table.statistics.circuits == 1
            # The virtual path's address is ours alone: neither graph learns
            # it, and neither lists the relayed connection as one to signal
            # over.
            for node, other in ((a, b), (b, a)):
                known = node.graph.get(other.node_id)
                assert known is None or all(
                    not ad.host.startswith("240.") for ad in known.addresses
                ), known
                listed = [c.node_id for c in node._active_connections()]
                assert other.node_id not in listed
            assert table.statistics.datagrams_forwarded > 4
            # Bytes through it, checked end to end by B's own handler.
            body = os.urandom(512 * 1024)
            async with conn.rpc.raw("sha256", {}) as call:
                await call.stream.send_all(body)
                await call.stream.send_eof()
                digest = b""
                while chunk := await call.stream.receive_some():
                    digest += chunk
            assert digest.decode() == hashlib.sha256(body).hexdigest()
            # R forwarded the circuit's datagrams in C: its table accounted
            # for them all, route() (the slow path) saw none of them.
            assert table.statistics.datagrams_forwarded > len(body) // 1400
            assert slow == 0


async def test_a_second_connection_ending_leaves_the_circuits(tmp_path: Path) -> None:
    """R dials B back (a second connection between them, as the node
    manager's check of a node that dialled in does) and closes it: B's
    reservation and the circuit through R live on over B's first
    connection. They used to end with any connection to R."""
    with trio.fail_after(30):
        async with nodes(tmp_path, ("a", {}), ("r", {"relay": "on"}), ("b", {})) as (
            a,
            r,
            b,
        ):
            conn = await a_circuit(a, r, b)
            assert (await conn.rpc.unary("nodesPing", {}))["success"] is True
            server = b.connections.statistics()["server"]
            accepted, held = server["accepted"], server["connections"]
            assert await r.connections.dial_back(b.node_id, b.address)
            with trio.fail_after(5):
                while True:
                    server = b.connections.statistics()["server"]
                    if server["accepted"] > accepted and server["connections"] == held:
                        break  # B accepted the dial-back and saw it end
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert not conn.connection.closed
            assert (await conn.rpc.unary("nodesPing", {}))["success"] is True
            table = r.connections.relay_table
            assert table is not None
            assert table.statistics.circuits == 1
            assert table.has_reservation(b.node_id, trio.current_time())


class Sha256(RawHandler):
    """Reads raw bytes to their end, answers their SHA-256 (hex)."""

    async def handle(self, call: RawCall, ctx: CallContext) -> None:
        stream = await call.accept({})
        digest = hashlib.sha256()
        while data := await stream.receive_some():
            digest.update(data)
        await stream.send_all(digest.hexdigest().encode())
        await stream.send_eof()


async def test_relay_refusals_on_the_wire(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with nodes(
            tmp_path,
            ("a", {}),
            ("r", {"relay": "on"}),
            ("b", {}),
            ("off", {"relay": "off"}),
        ) as (a, r, b, off):
            to_r = await a.connect(r.node_id, r.address)
            await connect_both(b, r)
            # B holds no reservation.
            with pytest.raises(RPCRemoteError) as info:
                await to_r.rpc.unary(
                    RELAY_CONNECT, {"targetNodeIdEncoded": str(b.node_id)}
                )
            assert info.value.remote_type == "ErrorRelayNoReservation"
            with pytest.raises(RPCRemoteError) as info:
                await to_r.rpc.unary(RELAY_CONNECT, {"targetNodeIdEncoded": "vnope"})
            assert info.value.remote_type == "ErrorRPCInvalidParams"
            # A node that does not relay does not serve the methods at all
            # (reset with code 1, as js-rpc answers an unknown method).
            to_off = await a.connect(off.node_id, off.address)
            with pytest.raises(RPCStreamReset) as reset:
                await to_off.rpc.unary(
                    RELAY_CONNECT, {"targetNodeIdEncoded": str(b.node_id)}
                )
            assert reset.value.reset_code == StreamCode.HANDLER_FAILED
            # B only opens circuits for relays it asked for a reservation.
            to_b = await a.connect(b.node_id, b.address)
            with pytest.raises(RPCRemoteError) as info:
                await to_b.rpc.unary(
                    RELAY_STOP,
                    {"sourceNodeIdEncoded": str(a.node_id), "circuit": "AAAAAAAAAAA"},
                )
            assert info.value.remote_type == "ErrorRelayPermissionDenied"
            with pytest.raises(RPCRemoteError) as info:
                await to_b.rpc.unary(
                    RELAY_STOP, {"sourceNodeIdEncoded": str(a.node_id), "circuit": "xx"}
                )
            assert info.value.remote_type == "ErrorRelayMalformed"
            # Everyone still serves.
            assert (await to_r.rpc.unary("nodesPing", {}))["success"]


async def test_a_relays_bad_answers_are_read_as_malformed(tmp_path: Path) -> None:
    liar = Liar()
    circuit = "AAECAwQFBgc"
    huge = 10**400  # no float holds it
    handlers = {RELAY_RESERVE: liar, RELAY_CONNECT: liar}
    with trio.fail_after(30):
        async with nodes(
            tmp_path, ("a", {}), ("r", {"handlers": handlers}), ("b", {})
        ) as (a, r, b):
            to_r = await a.connect(r.node_id, r.address)
            # An answer we cannot read is no reservation (and no bug of ours).
            unreadable: list[JSONValue] = [
                None, [], {}, {"expiresMs": "60000"}, {"expiresMs": 0},
                {"expiresMs": True}, {"expiresMs": huge}, {"expiresMs": {"ms": 60000}},
            ]  # fmt: skip
            for answer in unreadable:
                liar.answer = answer
                assert await a.connections.reserve(to_r) is None, answer
            liar.answer = {"expiresMs": 90_000}
            assert await a.connections.reserve(to_r) == 90.0
            malformed: list[tuple[JSONValue, str]] = [
                ([], "answer must be an object"),
                ({"durationMs": 1}, "answer.circuit is missing"),
                ({"circuit": "!" * 11}, "answer.circuit must be base64url"),
                ({"circuit": [circuit]}, "answer.circuit must be base64url"),
                ({"circuit": "AAAA"}, "answer.circuit must be 8 bytes"),
                ({"circuit": circuit, "maxPacket": "1400"},
                 "answer.maxPacket must be a packet size (1-65535)"),
                ({"circuit": circuit, "maxPacket": huge},
                 "answer.maxPacket must be a packet size (1-65535)"),
            ]  # fmt: skip
            for answer, message in malformed:
                liar.answer = answer
                with pytest.raises(RelayMalformedError) as info:
                    await a.connections.connect_relayed(b.node_id, to_r)
                assert str(info.value) == f"the relay's {message}"
            assert a.connections.task_errors == 0
            assert (await to_r.rpc.unary("nodesPing", {}))["success"]


async def test_a_circuit_past_its_budget_ends_cleanly(tmp_path: Path) -> None:
    tight = RelayLimits(circuit_bytes=200_000)
    with trio.fail_after(30):
        async with nodes(
            tmp_path,
            ("a", {}),
            ("r", {"relay": "on", "relay_limits": tight}),
            ("b", {}),
        ) as (a, r, b):
            conn = await a_circuit(a, r, b)
            stream = await conn.connection.open_stream()
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                await stream.send_all(os.urandom(2 * 1024 * 1024))
            with trio.fail_after(10):
                await conn.connection.wait_closed()
            table = r.connections.relay_table
            assert table is not None
            assert table.statistics.circuits_over_budget == 1
            assert table.statistics.circuits == 0
            # Forwarded in C, within the budget each way.
            assert 0 < table.statistics.bytes_forwarded <= 2 * tight.circuit_bytes
            # The nodes keep running, and can open a new circuit.
            via = a.connections.get(r.node_id)
            assert via is not None
            again = await a.connections.connect_relayed(b.node_id, via)
            assert (await again.rpc.unary("nodesPing", {}))["success"]


async def replaced(
    node: PolykeyNode, peer: NodeId, relayed: NodeConnection
) -> NodeConnection:
    """The punched connection that took ``relayed``'s place in ``node``'s
    pool (waited for, 10 s at most)."""
    with trio.fail_after(10):
        while node.connections.get(peer) is relayed:  # noqa: ASYNC110
            await trio.sleep(0.05)
    upgraded = node.connections.get(peer)
    assert upgraded is not None
    assert upgraded.path is ConnectionPath.PUNCHED
    return upgraded


async def test_a_relayed_connection_upgrades_to_a_punched_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(punching_module, "_UPGRADE_FIRST", 0.2)
    with trio.fail_after(30):
        async with nodes(tmp_path, ("a", {}), ("r", {"relay": "on"}), ("b", {})) as (
            a,
            r,
            b,
        ):
            relayed = await a_circuit(a, r, b)
            assert relayed.path is ConnectionPath.RELAYED
            # On loopback the punch works at once: the punched connection
            # takes the relayed one's place, which is closed after a grace.
            upgraded = await replaced(a, b.node_id, relayed)
            assert a.connections.upgrades == 1
            assert (await upgraded.rpc.unary("nodesPing", {}))["success"]
            with trio.fail_after(10):
                await relayed.connection.wait_closed()


@pytest.mark.parametrize("failure", ["peer", "bug"])
async def test_a_failed_upgrade_attempt_is_told_by_kind_and_the_next_one_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """One attempt of the upgrade fails: the peer's failure at DEBUG and not
    counted, a bug of ours at WARNING with the peer and counted in
    task_errors; either way the relayed connection carries on and the next
    attempt upgrades it."""
    monkeypatch.setattr(punching_module, "_UPGRADE_FIRST", 0.2)
    dial = punching_module.Puncher._dial
    failed: list[NodeId] = []

    async def first_fails(self: Any, node_id: NodeId, address: Any) -> Any:
        if not failed:
            failed.append(node_id)
            await trio.lowlevel.checkpoint()
            if failure == "peer":
                raise OSError("host unreachable")
            raise KeyError("lost track")
        return await dial(self, node_id, address)

    monkeypatch.setattr(punching_module.Puncher, "_dial", first_fails)
    caplog.set_level(logging.DEBUG, logger="polykey.nodes.connections")
    with trio.fail_after(30):
        async with nodes(tmp_path, ("a", {}), ("r", {"relay": "on"}), ("b", {})) as (
            a,
            r,
            b,
        ):
            relayed = await a_circuit(a, r, b)
            await replaced(a, b.node_id, relayed)
            assert failed == [b.node_id]
            assert a.connections.task_errors == (1 if failure == "bug" else 0)
    told = [r for r in caplog.records if "upgrade of" in r.getMessage()]
    assert len(told) == 1
    assert str(b.node_id) in told[0].getMessage()
    assert told[0].levelno == (logging.WARNING if failure == "bug" else logging.DEBUG)


def test_circuit_type() -> None:
    assert attrs.has(Circuit)


async def test_short_lived_clients_leave_no_entries_behind(tmp_path: Path) -> None:
    """A seed meets clients that connect, call once and go: each enters the
    graph unconfirmed and leaves it with its connection; a node the seed
    dialled itself stays."""
    from tests.helpers import dial

    with trio.fail_after(60):
        async with nodes(tmp_path, ("seed", {}), ("kept", {})) as (seed, kept):
            await seed.connect(kept.node_id, kept.address)  # dialled by the seed
            for _ in range(10):
                await dial(seed.node_id, seed.address)  # a client, closed after
            with trio.fail_after(10):
                while seed.manager.statistics().removed_unconfirmed < 10:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert len(seed.graph) == 1
            assert seed.graph.get(kept.node_id) is not None
            assert seed.manager.confirmed(kept.node_id)
