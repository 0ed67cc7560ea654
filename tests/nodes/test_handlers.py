"""The node RPC methods over real RPC (memory streams), and what bad peers send."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from polykey.keys import NodeId
from polykey.nodes import (
    ActiveConnection,
    ConnectionTransport,
    NodeAddress,
    NodeContact,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
    NodesAgentAPI,
    node_handlers,
    request_closest_active_connections,
    request_closest_local_nodes,
    request_ping,
)
from polykey.quic import Address
from polykey.rpc import (
    CallContext,
    Handler,
    JSONObject,
    RPCClient,
    RPCRemoteError,
    RPCServer,
    ServerHandler,
    memory_stream_pair,
)

from .helpers import addr

OWN = NodeId.from_int(0xA1 << 248)
CALLER = NodeId.from_int(0xC0 << 248)


@asynccontextmanager
async def serve(
    manifest: Mapping[str, Handler[Any, Any]], caller: NodeId = CALLER
) -> AsyncIterator[RPCClient[NodesAgentAPI]]:
    async with RPCServer(manifest, timeout=15) as server:

        async def open_stream() -> trio.abc.HalfCloseableStream:
            ours, theirs = memory_stream_pair()
            await server.handle_stream(
                theirs, {"node_id": caller, "host": "10.9.9.9", "port": 1}
            )
            return ours

        yield RPCClient(NodesAgentAPI, open_stream, timeout=15)


def near(d: int) -> NodeId:
    return NodeId.from_int(OWN.to_int() ^ d)


async def test_closest_local_nodes_shape_and_order() -> None:
    graph = NodeGraph(OWN)
    for d in range(1, 30):
        graph.add(near(d), [addr(d), NodeAddress("::1", 2000 + d)], 1_700_000_000.5)
    graph.add(CALLER, addr(99), 0.0)
    graph.mark_failed(near(3))
    target = near(0x10)
    with trio.fail_after(10):
        async with serve(node_handlers(graph)) as client:
            raw: list[JSONObject] = []
            async with client.methods.nodes_closest_local_nodes_get(
                {"nodeIdEncoded": target.encode()}
            ) as results:
                async for message in results:
                    raw.append(message)
            contacts = await request_closest_local_nodes(client, target)
    assert len(raw) == 20
    first = raw[0]
    assert set(first) == {"nodeIdEncoded", "nodeContact"}
    assert first["nodeIdEncoded"] == near(0x10).encode()
    assert first["nodeContact"] == {
        "10.0.0.16-1314": {
            "mode": "direct",
            "connectedTime": 1_700_000_000_500,
            "scopes": ["global"],
        },
        "::1-2016": {
            "mode": "direct",
            "connectedTime": 1_700_000_000_500,
            "scopes": ["global"],
        },
    }
    expected = [
        c.node_id
        for c in graph.closest(target, 40, exclude_failed=True)
        if c.node_id != CALLER
    ]
    assert [c.node_id for c in contacts] == expected[:20]
    assert near(3) not in [c.node_id for c in contacts]
    assert contacts[0].addresses == (addr(0x10), NodeAddress("::1", 2016))


async def drain(client: RPCClient[NodesAgentAPI], params: JSONObject) -> None:
    async with client.methods.nodes_closest_local_nodes_get(params) as results:
        async for _ in results:
            pass


async def test_invalid_params_are_refused() -> None:
    with trio.fail_after(10):
        async with serve(node_handlers(NodeGraph(OWN))) as client:
            for params in ({}, {"nodeIdEncoded": "vnope"}, {"nodeIdEncoded": 5}):
                with pytest.raises(RPCRemoteError) as info:
                    await drain(client, params)
                assert info.value.remote_code == -32602


async def test_ping_and_active_connections() -> None:
    conns = [
        ActiveConnection(near(5), addr(5), "c1", timeout=1000.0),
        ActiveConnection(near(5), NodeAddress("::1", 9), "c2", primary=False),
        ActiveConnection(near(1), addr(1), "c3"),
    ]
    with trio.fail_after(10):
        async with serve(
            node_handlers(NodeGraph(OWN), active_connections=lambda: conns)
        ) as client:
            assert await request_ping(client)
            pong = await client.methods.nodes_ping({})
            assert pong["type"] == "success"
            assert pong["success"] is True
            # The caller's address as the handler's transport saw it.
            assert pong["address"] == {"host": "10.9.9.9", "port": 1}
            raw = []
            async with client.methods.nodes_closest_active_connections_get(
                {"nodeIdEncoded": near(0).encode()}
            ) as results:
                async for message in results:
                    raw.append(message)
            contacts = await request_closest_active_connections(client, near(0))
    assert raw[0] == {
        "nodeId": near(1).encode(),
        "connections": {
            "c3": {
                "host": "10.0.0.1",
                "hostName": None,
                "port": 1314,
                "timeout": None,
                "primary": True,
            }
        },
    }
    assert raw[1]["connections"]["c2"]["primary"] is False
    assert contacts == [
        NodeContact(near(1), [addr(1)]),
        NodeContact(near(5), [addr(5), NodeAddress("::1", 9)]),
    ]


# -- bad peers -------------------------------------------------------------------

HONEST = NodeId.from_int(0x77 << 248)


def evil_messages(evil_id: NodeId, target: NodeId) -> list[object]:
    good = {"mode": "direct", "connectedTime": 0, "scopes": ["global"]}
    return [
        "not an object",
        42,
        {"nodeIdEncoded": "garbage", "nodeContact": {"10.0.0.1-1": good}},
        {"nodeIdEncoded": near(1).encode()},  # no nodeContact
        {"nodeIdEncoded": near(2).encode(), "nodeContact": ["10.0.0.1-1"]},
        {
            "nodeIdEncoded": near(3).encode(),
            "nodeContact": {"fe80::1%eth0-1314": good},
        },
        {"nodeIdEncoded": near(4).encode(), "nodeContact": {"10.0.0.4-0": good}},
        {"nodeIdEncoded": near(5).encode(), "nodeContact": {"0.0.0.0-1314": good}},
        {"nodeIdEncoded": near(6).encode(), "nodeContact": {"10.0.0.6-1314": "direct"}},
        {
            "nodeIdEncoded": near(7).encode(),
            "nodeContact": {"10.0.0.7-1314": dict(good, mode="relay")},
        },
        # our own NodeId and the evil peer's own, as neighbours
        {"nodeIdEncoded": OWN.encode(), "nodeContact": {"10.6.6.6-1": good}},
        {"nodeIdEncoded": evil_id.encode(), "nodeContact": {"10.6.6.6-2": good}},
        # the target, at an address nobody has
        {"nodeIdEncoded": target.encode(), "nodeContact": {"10.6.6.6-3": good}},
        # a contact with a thousand addresses: only a few are looked at
        {
            "nodeIdEncoded": near(8).encode(),
            "nodeContact": {f"10.1.{i // 250}.{i % 250}-1": good for i in range(1000)},
        },
        # a real node, among the noise
        {"nodeIdEncoded": HONEST.encode(), "nodeContact": {"10.7.7.7-1314": good}},
    ] + [  # and then a flood
        {
            "nodeIdEncoded": near(1000 + i).encode(),
            "nodeContact": {f"10.2.{i // 250}.{i % 250}-1": good},
        }
        for i in range(500)
    ]


class Evil(ServerHandler[JSONObject, object]):
    def __init__(self, messages: Callable[[NodeId], list[object]]) -> None:
        self.messages = messages
        self.sent = 0

    async def handle(
        self, params: JSONObject, ctx: CallContext
    ) -> AsyncIterator[object]:
        for message in self.messages(NodeId.from_string(str(params["nodeIdEncoded"]))):
            self.sent += 1
            yield message


async def test_bad_node_lists_are_filtered_and_capped() -> None:
    evil_id = near(0xE0)
    evil = Evil(lambda target: evil_messages(evil_id, target))
    target = near(0x1234)
    with trio.fail_after(10):
        async with serve({"nodesClosestLocalNodesGet": evil}) as client:
            contacts = await request_closest_local_nodes(client, target)
    # 20 messages read; the stream was cut there, whatever the peer had left.
    assert evil.sent < 40
    ids = [c.node_id for c in contacts]
    for bad in (near(1), near(2), near(3), near(4), near(5), near(6), near(7)):
        assert bad not in ids
    assert HONEST in ids
    assert OWN in ids
    assert evil_id in ids
    assert target in ids
    many = next(c for c in contacts if c.node_id == near(8))
    assert len(many.addresses) == 5
    assert len(contacts) == 20 - 12 + 2  # 20 read, 10 were unusable


async def test_bad_peer_cannot_corrupt_the_graph() -> None:
    """A lookup through a lying peer: the graph only learns who answered."""
    evil_id = near(0xE0)
    evil_addr = NodeAddress("10.6.6.6", 1314)
    honest_addr = NodeAddress("10.7.7.7", 1314)
    evil_server = node_handlers(NodeGraph(evil_id))
    evil_server["nodesClosestLocalNodesGet"] = Evil(lambda t: evil_messages(evil_id, t))
    honest_graph = NodeGraph(HONEST)
    servers: dict[NodeId, tuple[NodeAddress, Mapping[str, Handler[Any, Any]]]] = {
        evil_id: (evil_addr, evil_server),
        HONEST: (honest_addr, node_handlers(honest_graph)),
    }
    async with trio.open_nursery() as nursery:
        running = {}
        for nid, (_, manifest) in servers.items():
            running[nid] = await nursery.start(RPCServer(manifest, timeout=15).run)

        class Pool:
            """What ConnectionTransport dials through: nothing pooled."""

            def get(self, nid: NodeId) -> None:
                return None

            async def connect(self, nid: NodeId, address: Address) -> SimpleNamespace:
                if nid not in servers or servers[nid][0].as_tuple() != address:
                    raise ConnectionError("unreachable")
                server = running[nid]

                async def open_stream() -> trio.abc.HalfCloseableStream:
                    ours, theirs = memory_stream_pair()
                    await server.handle_stream(theirs, {"node_id": OWN})
                    return ours

                return SimpleNamespace(rpc=RPCClient(None, open_stream, timeout=15))

            async def dial_back(self, nid: NodeId, address: Address) -> bool:
                raise AssertionError("nothing connects to this node")

        graph = NodeGraph(OWN)
        graph.add(evil_id, evil_addr, 0.0)
        manager = NodeManager(
            graph,
            ConnectionTransport(Pool()),
            config=NodeManagerConfig(query_timeout=5),
            clock=trio.current_time,
        )
        with trio.fail_after(120):
            result = await manager.lookup(near(0x1234), find=True)
            await manager.lookup(near(0x1234))
        nursery.cancel_scope.cancel()
    assert result.found is None
    members = {c.node_id: c for c in graph}
    assert set(members) == {evil_id, HONEST}
    assert members[HONEST].addresses == (honest_addr,)
    assert OWN not in graph
    for c in graph:
        for a in c.addresses:
            assert a.port != 0
            assert "%" not in a.host
