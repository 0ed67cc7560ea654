"""NatNetwork: simulated nodes behind simulated NATs, for MockClock tests.

Each :class:`NatNode` is a real :class:`~polykey.nodes.NodeGraph`,
:class:`~polykey.nodes.NodeManager` and :class:`~polykey.nodes.NodeFinder`
with an Ed25519 identity, serving the real node handlers (the signalling
ones included) on an :class:`~polykey.rpc.RPCServer`. What stands in for
QUIC is :class:`SimConnections`, the node's
:class:`~polykey.nodes._finder.Connector`:

* **Packets.** A node has one socket (``local``): a public endpoint, or a
  private one behind its own :class:`~polykey.testing.Nat`. A packet leaves
  through the sender's NAT (mapped at once) and arrives ``latency`` seconds
  later, when the receiver's NAT admits or drops it. Nothing is ever routed
  to a private address.
* **Dialling** (:meth:`SimConnections.connect`) is a handshake: the
  dialler's Initial must reach the target and the target's answer must come
  back from the address dialled, which is what decides it through NATs.
  Initials are re-sent (1 s, doubling, as QUIC's PTO) until an answer, the
  caller's deadline, or the 30 s idle timeout. The wrong NodeId at the
  address fails it (as certificate verification would).
* **Punching** (:meth:`SimConnections.connect_punched`) runs the real
  signalling: ``nodesConnectionSignalInitial`` over the link to the
  signaller, whose handler checks it holds a live link to the target, signs,
  forwards ``nodesConnectionSignalFinal`` and answers the target's address
  as it sees it. The target then sprays noise toward the initiator's
  address as the signaller saw it, and the initiator sprays Initials toward
  the target's, on the real schedule (:func:`polykey.quic.spray_delays`),
  and dials too wherever noise from the target's IP comes from (the
  peer-reflexive address of a symmetric NAT).
* **Relaying** (:meth:`SimConnections.connect_relayed`) is modelled, not
  run: it works when the relay offers relaying (by default, a node not
  behind a NAT) and holds links to both, after a request, the relay's
  round trip to the target, and a handshake through it (8 latencies).
* **Links** (:class:`SimLink`, one per end) carry an RPC client over
  in-memory streams (a call's request and its answer each take
  ``latency``) and a ``path``. Every established link is reported to both
  nodes' managers (``note_connection``, as ``on_connection`` does; a relayed
  one only refreshes a known node). Keep-alives cross the NATs every
  ``keepalive`` seconds, which keeps NAT mappings of live links open; a link
  whose packets stop getting through (a silently dead peer) closes after
  ``idle_timeout``. Links are not reaped when idle; :meth:`SimConnections.close`
  drops one, as its TTL would.

Not modelled: loss, hairpinning and several hosts behind one NAT, an idle
TTL, the relay's reservations and limits, and the upgrade of a relayed link
to a punched one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self

import attrs
import trio

from ..keys import KeyPair, NodeId, NodeIdentity
from ..nodes import (
    DEFAULT_K,
    ConnectionPath,
    ConnectionTransport,
    JoinResult,
    NodeAddress,
    NodeContact,
    NodeFinder,
    NodeGraph,
    NodeManager,
    NodeManagerConfig,
    format_host_port,
    node_handlers,
)
from ..quic import Address, spray_delays
from ..rpc import Handler, RPCClient, RPCServer, memory_stream_pair
from ._nat import Nat, NatBehaviour, NatType
from ._network import Unreachable
from ._simconn import SimConnections
from ._simlink import (
    Attempt,
    Initial,
    LatentStream,
    Packet,
    Refused,
    SimLink,
    Wire,
    pto_delays,
)

__all__ = ["NatNetwork", "NatNetworkStatistics", "NatNode"]

KillMode = Literal["timeout", "refuse"]

#: Every node's socket port (NATs keep it when they can).
PORT: Final = 1314
#: A relayed link that gives way to a direct one lingers this long.
_REPLACED_GRACE: Final = 5.0


@attrs.define
class NatNetworkStatistics:
    #: Packets sent: Initials, answers, punches (keep-alives are not
    #: counted; they cross the NATs without taking time).
    packets: int = 0
    delivered: int = 0
    #: Dropped by the receiver's NAT (no mapping, or filtered).
    filtered: int = 0
    #: To an address no host or NAT has.
    unroutable: int = 0
    to_dead: int = 0
    #: Links made, by path.
    direct: int = 0
    punched: int = 0
    relayed: int = 0
    #: Links closed because their packets stopped getting through.
    lost: int = 0


@attrs.define(eq=False)
class NatNode:
    """One simulated node (see the module doc)."""

    identity: NodeIdentity
    #: Its socket: public, or private behind ``nat``.
    local: Address
    nat: Nat | None
    graph: NodeGraph
    #: Whether it relays for others (connect_relayed through it).
    relays: bool
    connections: SimConnections = attrs.field(init=False)
    manager: NodeManager = attrs.field(init=False)
    finder: NodeFinder = attrs.field(init=False)
    server: RPCServer | None = None
    alive: bool = True
    kill_mode: KillMode = "timeout"
    scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def address(self) -> NodeAddress:
        """Where others dial it; only a public node has one of its own."""
        if self.nat is not None:
            raise ValueError(f"{self.node_id} is behind a NAT: no address of its own")
        return NodeAddress(*self.local)

    @property
    def contact(self) -> NodeContact:
        return NodeContact(self.node_id, (self.address,))


class NatNetwork:
    """``async with NatNetwork() as net: seed = await net.spawn() ...``

    ``latency``: one way, seconds (virtual under MockClock). ``keepalive``
    and ``idle_timeout`` are QUIC's (10 s, 30 s); ``unreplied_timeout`` and
    ``established_timeout`` every NAT's (30 s, 120 s).
    """

    def __init__(
        self,
        *,
        config: NodeManagerConfig | None = None,
        k: int = DEFAULT_K,
        latency: float = 0.02,
        rpc_timeout: float = 15.0,
        keepalive: float = 10.0,
        idle_timeout: float = 30.0,
        unreplied_timeout: float = 30.0,
        established_timeout: float = 120.0,
        seed: int = 0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.config = config or NodeManagerConfig()
        self.k = k
        self.latency = latency
        self.rpc_timeout = rpc_timeout
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.unreplied_timeout = unreplied_timeout
        self.established_timeout = established_timeout
        self.rng = random.Random(seed)
        self.nodes: dict[NodeId, NatNode] = {}
        self.stats = NatNetworkStatistics()
        # Public sockets, NATs by external IP, and who is behind them.
        self._hosts: dict[Address, NatNode] = {}
        self._nats: dict[str, Nat] = {}
        self._inside: dict[Address, NatNode] = {}
        self._wires: set[Wire] = set()
        self._public = 0
        self._private = 0
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None

    async def __aenter__(self) -> Self:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._keepalives)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        result: bool | None = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        return result

    # -- nodes -----------------------------------------------------------------------

    def _public_ip(self) -> str:
        # 198.18.0.0/15 (RFC 2544), standing for the internet.
        self._public += 1
        n = self._public
        if n >= 1 << 17:
            raise RuntimeError("public addresses exhausted")
        return f"198.{18 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"

    async def spawn(
        self,
        identity: NodeIdentity | None = None,
        *,
        nat: NatType | NatBehaviour = NatType.NONE,
        join: Sequence[NatNode] = (),
        run: bool = True,
        relays: bool | None = None,
        handlers: Mapping[str, Handler[Any, Any]] | None = None,
    ) -> NatNode:
        """Start a node, behind a new NAT of type ``nat`` (none by
        default), then join through ``join`` if given. ``relays``: whether
        it relays for others (default: when it is not behind a NAT, as the
        agent's ``relay_mode="auto"``). ``run``: start its manager's timers.
        ``handlers``: RPC methods it serves besides the node methods (as
        the agent's ``NodeSettings.handlers``)."""
        if self._nursery is None:
            raise RuntimeError("use the network as an async context manager")
        if identity is None:
            identity = NodeIdentity.generate(KeyPair.from_seed(self.rng.randbytes(32)))
        if identity.node_id in self.nodes:
            raise ValueError(f"node {identity.node_id} already exists")
        behind: Nat | None = None
        if nat is not NatType.NONE:
            self._private += 1
            i = self._private
            local = (f"10.{(i >> 8) & 255}.{i & 255}.2", PORT)
            behind = Nat(
                nat,
                self._public_ip(),
                rng=random.Random(self.rng.getrandbits(64)),
                unreplied_timeout=self.unreplied_timeout,
                established_timeout=self.established_timeout,
            )
        else:
            local = (self._public_ip(), PORT)
        node = NatNode(
            identity,
            local,
            behind,
            NodeGraph(identity.node_id, k=self.k),
            relays=behind is None if relays is None else relays,
        )
        node.connections = SimConnections(self, node)
        node.manager = NodeManager(
            node.graph,
            ConnectionTransport(node.connections, limit=self.k),
            config=self.config,
            rng=random.Random(self.rng.getrandbits(64)),
            clock=trio.current_time,
            attempts=node.connections.attempts,
        )
        node.finder = NodeFinder(node.manager, node.connections)
        self.nodes[node.node_id] = node
        if behind is None:
            self._hosts[local] = node
        else:
            self._nats[behind.external_ip] = behind
            self._inside[local] = node
        await self._nursery.start(self._run_node, node, run, handlers or {})
        if join:
            await self.join(node, join)
        return node

    async def _run_node(
        self,
        node: NatNode,
        run: bool,
        extra: Mapping[str, Handler[Any, Any]],
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        handlers = {
            **node_handlers(
                node.graph,
                active_connections=node.connections.active_connections,
                signal_host=node.connections,
            ),
            **extra,
        }
        with trio.CancelScope() as scope:
            node.scope = scope
            async with trio.open_nursery() as nursery:
                node.nursery = nursery
                node.server = await nursery.start(
                    RPCServer(handlers, timeout=self.rpc_timeout).run
                )
                if run:
                    await nursery.start(node.manager.run)
                task_status.started()
        node.nursery = None

    async def join(self, node: NatNode, seeds: Sequence[NatNode]) -> JoinResult:
        return await node.manager.join([s.contact for s in seeds])

    def kill(self, node: NatNode, *, mode: KillMode = "timeout") -> None:
        """Stop ``node``. ``"timeout"``: it falls silent (its links look
        alive until their idle timeout, dials to it get no answer);
        ``"refuse"``: its host refuses (links close, dials fail at once)."""
        node.alive = False
        node.kill_mode = mode
        if node.scope is not None:
            node.scope.cancel()
        if mode == "refuse":
            for wire in [w for w in self._wires if node in (w.a, w.b)]:
                self._close_wire(wire)

    def live_nodes(self) -> list[NatNode]:
        return [n for n in self.nodes.values() if n.alive]

    def links(self) -> list[tuple[NatNode, NatNode, ConnectionPath]]:
        """Every open link: (dialler, target, path)."""
        return [(w.a, w.b, w.path) for w in self._wires if not w.closed]

    # -- packets -----------------------------------------------------------------------

    def _translate(self, node: NatNode, dst: Address, now: float) -> Address:
        if node.nat is None:
            return node.local
        return node.nat.outbound(node.local, dst, now)

    def _route(
        self, src: Address, dst: Address, now: float, *, count: bool = True
    ) -> NatNode | None:
        """Who a packet from ``src`` to ``dst`` reaches now (None: dropped)."""
        node = self._hosts.get(dst)
        if node is not None:
            return node
        nat = self._nats.get(dst[0])
        if nat is None:
            self.stats.unroutable += count
            return None
        internal = nat.inbound(src, dst[1], now)
        if internal is None:
            self.stats.filtered += count
            return None
        return self._inside.get(internal)

    def _send(self, sender: NatNode, dst: Address, packet: Packet) -> None:
        if self._nursery is None:
            return
        src = self._translate(sender, dst, trio.current_time())
        self.stats.packets += 1
        self._nursery.start_soon(self._fly, src, dst, packet)

    async def _fly(self, src: Address, dst: Address, packet: Packet) -> None:
        await trio.sleep(self.latency)
        node = self._route(src, dst, trio.current_time())
        if node is None:
            return
        if not node.alive:
            self.stats.to_dead += 1
            if node.kill_mode == "refuse" and isinstance(packet, Initial):
                self._send(node, src, Refused(packet.attempt))
            return
        self.stats.delivered += 1
        node.connections._receive(src, packet)

    async def _resend(
        self, attempt: Attempt, dest: Address, delays: Iterator[float]
    ) -> None:
        while not attempt.done.is_set() and dest not in attempt.failed:
            self._send(attempt.dialler, dest, Initial(attempt))
            await trio.sleep(next(delays))

    async def _handshake(
        self,
        dialler: NatNode,
        node_id: NodeId,
        destinations: tuple[Address, ...],
        path: ConnectionPath,
        *,
        punch: bool = False,
    ) -> SimLink:
        """Send Initials until one is answered: the dialler's link."""
        attempt = Attempt(
            dialler,
            node_id,
            path,
            set(destinations),
            destinations[0][0],
            open_ended=punch,
        )
        conns = dialler.connections
        with trio.move_on_after(self.idle_timeout):
            async with trio.open_nursery() as nursery:
                attempt.nursery = nursery
                if punch:
                    conns._punch_attempts.add(attempt)
                try:
                    for dest in destinations:
                        delays = spray_delays(conns._rng) if punch else pto_delays()
                        nursery.start_soon(self._resend, attempt, dest, delays)
                    await attempt.done.wait()
                    nursery.cancel_scope.cancel()
                finally:
                    conns._punch_attempts.discard(attempt)
                    attempt.nursery = None
        if attempt.answer is None:
            raise attempt.error or Unreachable(
                f"{node_id} at {', '.join(format_host_port(*d) for d in destinations)}:"
                f" no answer in {self.idle_timeout:g} s"
            )
        target, src, seen = attempt.answer
        return self._establish(dialler, target, seen, src, path)

    async def _relay(self, a: NatNode, node_id: NodeId, relay: SimLink) -> SimLink:
        """A's request to the relay, the relay's to the target and back, the
        answer, then the inner handshake through the relay."""
        r_wire = relay.wire
        r = r_wire.b if r_wire.a is a else r_wire.a
        await self._reach(r_wire, r, self.latency)
        if not r.relays:
            await trio.sleep(self.latency)
            raise Unreachable(f"{r.node_id} does not relay")
        to_b = r.connections.get(node_id)
        if to_b is None:
            await trio.sleep(self.latency)
            raise Unreachable(f"{r.node_id} has no connection to {node_id}")
        b_wire = to_b.wire
        b = b_wire.b if b_wire.a is r else b_wire.a
        await self._reach(b_wire, b, 2 * self.latency)
        await self._reach(r_wire, r, 5 * self.latency)
        if r_wire.closed or b_wire.closed or not b.alive:
            raise Unreachable(f"the circuit through {r.node_id} closed")
        a_seen = next(e for e in r_wire.ends or () if e.node_id == a.node_id).address
        return self._establish(
            a, b, a_seen, to_b.address, ConnectionPath.RELAYED, via=(r_wire, b_wire)
        )

    async def _reach(self, wire: Wire, peer: NatNode, seconds: float) -> None:
        """Wait ``seconds`` for ``peer``'s part over ``wire``; a silent peer
        never answers (until the wire closes), a refusing one fails."""
        await trio.sleep(seconds)
        if peer.alive and not wire.closed:
            return
        if not wire.closed and peer.kill_mode == "timeout":
            await wire.closed_event.wait()
        raise Unreachable(f"{peer.node_id} is down")

    # -- links -----------------------------------------------------------------------------

    def _establish(
        self,
        a: NatNode,
        b: NatNode,
        a_seen: Address,
        b_seen: Address,
        path: ConnectionPath,
        *,
        via: tuple[Wire, Wire] | None = None,
    ) -> SimLink:
        now = trio.current_time()
        wire = Wire(a, b, a_seen, b_seen, path, now, via)
        a_end = SimLink(b.node_id, b_seen, path, True, now, wire)
        b_end = SimLink(a.node_id, a_seen, path, False, now, wire)
        a_end.rpc = self._client(wire, a_end, b_end, b)
        b_end.rpc = self._client(wire, b_end, a_end, a)
        wire.ends = (a_end, b_end)
        self._wires.add(wire)
        if via is not None:
            for carrier in via:
                carrier.carried.append(wire)
        a_pooled = a.connections._adopt(a_end)
        b_pooled = b.connections._adopt(b_end)
        held = a.connections.get(b.node_id)
        if not (a_pooled or b_pooled):
            # Both hold another link already: this one serves nobody.
            self._close_wire(wire)
            assert held is not None
            return held
        if path is ConnectionPath.DIRECT:
            self.stats.direct += 1
        elif path is ConnectionPath.PUNCHED:
            self.stats.punched += 1
        else:
            self.stats.relayed += 1
        for node, end in ((a, a_end), (b, b_end)):
            if path is ConnectionPath.RELAYED:
                node.manager.note_contact(end.node_id, ())
            else:
                node.manager.note_connection(end.node_id, *end.address)
        return a_end if a_pooled or held is None else held

    def _client(
        self, wire: Wire, end: SimLink, far: SimLink, peer: NatNode
    ) -> RPCClient[Any]:
        # The peer's handlers see the caller where it sees it.
        meta = {"node_id": far.node_id, "host": far.address[0], "port": far.address[1]}

        async def open_stream() -> trio.abc.HalfCloseableStream:
            if wire.closed:
                raise trio.BrokenResourceError("the connection is closed")
            if not peer.alive:
                if peer.kill_mode == "timeout":
                    await wire.closed_event.wait()
                raise trio.BrokenResourceError(f"{peer.node_id} is down")
            if not self._exchange(wire):
                raise trio.BrokenResourceError("the connection's packets are lost")
            server = peer.server
            if server is None:
                raise trio.BrokenResourceError(f"{peer.node_id} serves nothing")
            ours, theirs = memory_stream_pair()
            await server.handle_stream(theirs, meta)
            return LatentStream(ours, self.latency * wire.hops)

        return RPCClient(None, open_stream, timeout=self.rpc_timeout)

    def _exchange(self, wire: Wire) -> bool:
        """A packet each way (a keep-alive): whether both got through."""
        if wire.via is not None:
            return all(self._exchange(w) for w in wire.via) and (
                wire.a.alive and wire.b.alive
            )
        now = trio.current_time()
        for x, x_seen, y, y_seen in (
            (wire.a, wire.a_seen, wire.b, wire.b_seen),
            (wire.b, wire.b_seen, wire.a, wire.a_seen),
        ):
            if not x.alive:
                return False
            # Mapped anew (a symmetric NAT that forgot it), it is a stranger.
            if self._translate(x, y_seen, now) != x_seen:
                return False
            if self._route(x_seen, y_seen, now, count=False) is not y:
                return False
        wire.last_ok = now
        return True

    async def _keepalives(self) -> None:
        while True:
            await trio.sleep(self.keepalive)
            now = trio.current_time()
            for wire in list(self._wires):
                if wire.closed or self._exchange(wire):
                    continue
                if now - wire.last_ok >= self.idle_timeout:
                    self.stats.lost += 1
                    self._close_wire(wire)

    def _close_wire(self, wire: Wire) -> None:
        if wire.closed:
            return
        wire.closed = True
        wire.closed_event.set()
        self._wires.discard(wire)
        for node, end in zip((wire.a, wire.b), wire.ends or (), strict=False):
            if node.connections._pool.get(end.node_id) is end:
                del node.connections._pool[end.node_id]
        for inner in wire.carried:
            self._close_wire(inner)

    def _close_later(self, wire: Wire) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._linger, wire)

    async def _linger(self, wire: Wire) -> None:
        await trio.sleep(_REPLACED_GRACE)
        self._close_wire(wire)
