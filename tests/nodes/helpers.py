"""Shared helpers for the nodes tests."""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from polykey.agent import PolykeyNode
from polykey.keys import NodeId
from polykey.nodes import NodeAddress, NodeConnection, NodeContact
from polykey.rpc import CallContext, JSONValue, UnaryHandler


def node_id(value: int) -> NodeId:
    return NodeId.from_int(value)


def random_id(rng: random.Random) -> NodeId:
    return NodeId(rng.randbytes(32))


def id_in_bucket(own: NodeId, index: int, rng: random.Random) -> NodeId:
    distance = (1 << index) | rng.getrandbits(index)
    return NodeId.from_int(own.to_int() ^ distance)


def addr(n: int, port: int = 1314) -> NodeAddress:
    return NodeAddress(f"10.0.{(n >> 8) & 255}.{n & 255}", port)


def contact(nid: NodeId, n: int = 1) -> NodeContact:
    return NodeContact(nid, (addr(n),))


class Liar(UnaryHandler[JSONValue, JSONValue]):
    """A method that answers whatever it was last told to: a signaller or a
    relay whose answers are not the shape they should be."""

    def __init__(self) -> None:
        self.answer: JSONValue = None

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONValue:
        return self.answer


async def connect_both(node: PolykeyNode, to: PolykeyNode) -> NodeConnection:
    """``node`` dials ``to`` and returns once ``to`` has pooled the
    connection too: a client's handshake completes half a round trip before
    the server's, and a signaller or a relay only forwards to the nodes it
    has pooled."""
    conn = await node.connect(to.node_id, to.address)
    while to.connections.get(node.node_id) is None:  # noqa: ASYNC110
        await trio.sleep(0.001)
    return conn


async def wait_for(what: Callable[[], bool], seconds: float = 10) -> None:
    """Until ``what()`` holds (the state of other tasks, polled), for at
    most ``seconds``."""
    with trio.fail_after(seconds):
        while not what():  # noqa: ASYNC110
            await trio.sleep(0.005)
