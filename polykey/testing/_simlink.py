"""The pieces of a simulated connection: wires, their ends (SimLink), the
latency of RPC over them, and the packets of a handshake (see _natnet)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ..keys import NodeId
from ..nodes import ConnectionPath, format_host_port
from ..quic import Address
from ..rpc import MemoryStream, RPCClient
from ._network import Unreachable

if TYPE_CHECKING:
    from ._natnet import NatNode

__all__ = [
    "Answer",
    "Attempt",
    "Initial",
    "LatentStream",
    "Noise",
    "Packet",
    "Refused",
    "SimLink",
    "Wire",
    "pto_delays",
]

#: QUIC's first retransmission of an Initial (quiche: 3 x its 333 ms
#: initial RTT), doubling after.
_FIRST_PTO: Final = 1.0


@attrs.define(eq=False)
class Wire:
    """One simulated connection; ``a`` dialled ``b``."""

    a: NatNode
    b: NatNode
    #: ``a`` as ``b`` sees it, and ``b`` as ``a`` sees it.
    a_seen: Address
    b_seen: Address
    path: ConnectionPath
    last_ok: float
    #: A relayed wire travels inside these two (a to relay, relay to b).
    via: tuple[Wire, Wire] | None = None
    ends: tuple[SimLink, SimLink] | None = None
    closed: bool = False
    closed_event: trio.Event = attrs.Factory(trio.Event)
    #: Relayed wires inside this one.
    carried: list[Wire] = attrs.Factory(list)

    @property
    def hops(self) -> int:
        return 1 if self.via is None else 2


@attrs.define(eq=False)
class SimLink:
    """One end of a simulated connection (a :class:`~polykey.nodes._finder.Link`)."""

    #: The node at the other end, and where this end sees it.
    node_id: NodeId
    address: Address
    path: ConnectionPath
    outgoing: bool
    since: float
    wire: Wire
    rpc: RPCClient[Any] = attrs.field(init=False)

    @property
    def closed(self) -> bool:
        return self.wire.closed


class LatentStream(trio.abc.HalfCloseableStream):
    """A client's end of an RPC stream: its request takes ``delay`` to get
    there, the first of the answer ``delay`` to come back."""

    def __init__(self, inner: MemoryStream, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self._sent = False
        self._received = False

    async def _travel(self) -> None:
        if not self._sent:
            self._sent = True
            await trio.sleep(self._delay)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._travel()
        await self._inner.send_all(data)

    async def send_all_and_eof(self, data: bytes | bytearray | memoryview) -> None:
        await self._travel()
        await self._inner.send_all_and_eof(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._travel()
        await self._inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._inner.receive_some(max_bytes)
        if not self._received:
            self._received = True
            await trio.sleep(self._delay)
        return data

    def reset(self, code: int) -> None:
        self._inner.reset(code)

    async def aclose(self) -> None:
        await self._inner.aclose()


# -- packets ------------------------------------------------------------------------


@attrs.define(eq=False)
class Attempt:
    """A handshake in progress."""

    dialler: NatNode
    node_id: NodeId
    path: ConnectionPath
    #: Where Initials go; a punch adds the sources of the target's noise
    #: that come from ``host``.
    destinations: set[Address]
    host: str
    #: Keep going when every destination failed (a punch waits for more).
    open_ended: bool = False
    failed: set[Address] = attrs.Factory(set)
    done: trio.Event = attrs.Factory(trio.Event)
    #: The answer: (target, where it answered from, where it saw us).
    answer: tuple[NatNode, Address, Address] | None = None
    error: Unreachable | None = None
    nursery: trio.Nursery | None = None

    def answered(self, src: Address, target: NatNode, seen: Address, ok: bool) -> None:
        if self.done.is_set() or src not in self.destinations:
            return  # a path we did not dial: QUIC drops it
        if ok:
            self.answer = (target, src, seen)
            self.done.set()
        else:
            self.fail(src, f"{format_host_port(*src)} is not {self.node_id}")

    def fail(self, dest: Address, why: str) -> None:
        self.failed.add(dest)
        self.error = Unreachable(why)
        if self.destinations <= self.failed and not self.open_ended:
            self.done.set()


@attrs.frozen(eq=False)
class Initial:
    attempt: Attempt


@attrs.frozen(eq=False)
class Answer:
    attempt: Attempt
    target: NatNode
    #: The dialler as the target saw it.
    seen: Address
    ok: bool


@attrs.frozen(eq=False)
class Refused:
    attempt: Attempt


@attrs.frozen(eq=False)
class Noise:
    """A punch packet."""


Packet = Initial | Answer | Refused | Noise


def pto_delays() -> Iterator[float]:
    delay = _FIRST_PTO
    while True:
        yield delay
        delay *= 2
