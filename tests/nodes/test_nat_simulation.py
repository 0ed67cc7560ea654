"""The real NodeFinder and NodeManager over a simulated network with NATs.

Deterministic: seeded identities and ports, MockClock(autojump_threshold=0),
virtual time. Every test is bounded by trio.fail_after in virtual time and
by pytest-timeout in real time (see test_fail_after_bounds_real_time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from polykey.keys import KeyPair, NodeIdentity
from polykey.nodes import (
    PUNCH_DURATION,
    ConnectionPath,
    NodeFinder,
    NodeManagerConfig,
    NodeNotFoundError,
    OwnNodeIdError,
    request_ping,
)
from polykey.nodes._finder import (
    _PUNCH_ATTEMPTS,
    _PUNCH_MIN,
    _RELAY_DELAY_ATTEMPTS,
    _RELAY_DELAY_MIN,
)
from polykey.rpc import CallContext, JSONValue, UnaryHandler
from polykey.testing import (
    Filtering,
    Mapping,
    NatBehaviour,
    NatNetwork,
    NatNode,
    NatType,
    SimLink,
    Unreachable,
)

pytestmark = pytest.mark.timeout(60)

QUIET = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)
#: One way, seconds.
L = 0.05
#: Virtual seconds any one test may take.
BOUND = 3600

NONE, FULL, PORT, SYM = (
    NatType.NONE,
    NatType.FULL_CONE,
    NatType.PORT_RESTRICTED,
    NatType.SYMMETRIC,
)
#: The pairs no punch can serve (tests/natlab/lab.py's can_hole_punch).
RELAYED = {(SYM, PORT), (PORT, SYM), (SYM, SYM)}


def relay_delay(attempt: float) -> float:
    return max(_RELAY_DELAY_MIN, _RELAY_DELAY_ATTEMPTS * attempt)


def punch_attempt(attempt: float) -> float:
    return max(_PUNCH_MIN, _PUNCH_ATTEMPTS * attempt)


def keep_only(node: NatNode, *keep: NatNode) -> None:
    """Close every link of ``node`` but those to ``keep`` (as idle TTLs
    would), so that the finder has to work for a connection."""
    kept = {k.node_id for k in keep}
    for link in node.connections.active():
        if link.node_id not in kept:
            node.connections.close(link.node_id)


async def two_behind_a_seed(
    net: NatNetwork, a_type: NatType | NatBehaviour, b_type: NatType | NatBehaviour
) -> tuple[NatNode, NatNode, NatNode]:
    seed = await net.spawn()
    b = await net.spawn(nat=b_type, join=[seed])
    a = await net.spawn(nat=a_type, join=[seed])
    for node in (a, b):
        keep_only(node, seed)
    return seed, a, b


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for n in task.child_nurseries for child in n.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


# -- every ordered pair --------------------------------------------------------------


@pytest.mark.parametrize("b_type", list(NatType), ids=lambda t: f"to-{t.value}")
@pytest.mark.parametrize("a_type", list(NatType), ids=lambda t: t.value)
async def test_every_ordered_pair_of_nat_types_connects(
    autojump_clock: trio.testing.MockClock, a_type: NatType, b_type: NatType
) -> None:
    """A finds and connects to B by NodeId through a public seed both
    joined: dialled where B lets anyone in, punched where B filters and a
    punch can work, relayed by the seed where none can."""
    async with NatNetwork(config=QUIET, latency=L, seed=16) as net:
        with trio.fail_after(BOUND):
            seed, a, b = await two_behind_a_seed(net, a_type, b_type)
            assert a.connections.get(b.node_id) is None
            attempt = a.manager.attempt_deadline()
            start = trio.current_time()
            link = await a.finder.connect(b.node_id)
            took = trio.current_time() - start
            assert isinstance(link, SimLink)
            assert link.node_id == b.node_id
            assert await request_ping(link.rpc)
            # B holds it too, by the same path; both noted the other where
            # they see it, unless relayed (no address to dial it at).
            back = b.connections.get(a.node_id)
            assert back is not None
            assert back.path is link.path
            noted = (a_type, b_type) not in RELAYED
            assert (b.node_id in a.graph) is noted
            assert (a.node_id in b.graph) is noted
        if b_type in (NONE, FULL):
            assert link.path is ConnectionPath.DIRECT
            assert took == pytest.approx(2 * L)  # B was known: one round trip
            assert a.finder.statistics.found_direct == 1
        elif (a_type, b_type) in RELAYED:
            assert link.path is ConnectionPath.RELAYED
            # Asking the seed, the finder's relay delay, then 8 one-way trips
            # (request, the relay's round trip to B, answer, inner handshake).
            assert took == pytest.approx(2 * L + relay_delay(attempt) + 8 * L)
            assert a.finder.statistics.found_relayed == 1
            assert net.stats.punched == 0
        else:
            assert link.path is ConnectionPath.PUNCHED
            # Ask the seed (2), signal (2: B starts punching as A gets the
            # answer), then the Initial and its answer; one more trip when B
            # is symmetric: A dials where B's punch came from.
            trips = 7 if b_type is SYM else 6
            assert took == pytest.approx(trips * L)
            assert a.finder.statistics.found_punched == 1
            assert seed.connections.signals_forwarded >= 1
            assert b.connections.punches == 1
        if (a_type, b_type) not in RELAYED:
            # Where B sees A; and for a symmetric B, A reached B at a port
            # of B's NAT that the seed never saw (peer-reflexive).
            seen_by_seed = seed.connections.get(b.node_id)
            assert seen_by_seed is not None
            assert (link.address == seen_by_seed.address) is (b_type is not SYM)


# -- dead nodes -------------------------------------------------------------------------


async def test_a_dead_target_costs_three_attempt_timeouts_not_15_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """B died long ago (its links are gone) but is still in A's graph and
    the seed's: the finder dials it (one attempt timeout), then the lookup
    asks it, backed off for that failure (two); the signalled search finds
    nobody connected to it."""
    async with NatNetwork(config=QUIET, latency=L, seed=2) as net:
        with trio.fail_after(BOUND):
            _, a, b = await two_behind_a_seed(net, NONE, NONE)
            assert b.node_id in a.graph
            keep_only(b, a)  # no link at all
            net.kill(b)  # silent
            attempt = a.manager.attempt_deadline()
            assert attempt < 1.0
            start = trio.current_time()
            with pytest.raises(NodeNotFoundError):
                await a.finder.connect(b.node_id)
            took = trio.current_time() - start
        assert took == pytest.approx(3 * attempt)
        assert a.finder.statistics.not_found == 1


async def test_a_silently_dead_target_costs_the_punch_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Just dead: the seed's link to B still looks alive (until QUIC's
    idle timeout), so the seed lists B and the finder punches and then
    relays toward a corpse; both end by the finder's own deadlines."""
    async with NatNetwork(config=QUIET, latency=L, seed=3) as net:
        with trio.fail_after(BOUND):
            seed, a, b = await two_behind_a_seed(net, NONE, PORT)
            net.kill(b)
            attempt = a.manager.attempt_deadline()
            start = trio.current_time()
            with pytest.raises(NodeNotFoundError):
                await a.finder.connect(b.node_id)
            took = trio.current_time() - start
            # The relay, tried after its delay, gets its own punch deadline.
            assert took == pytest.approx(
                2 * L + relay_delay(attempt) + punch_attempt(attempt)
            )
            assert took < 15
            # Later the idle timeout closes the seed's link to B.
            await trio.sleep(net.idle_timeout + net.keepalive)
            assert seed.connections.get(b.node_id) is None
            assert net.stats.lost >= 1


async def test_a_dead_signaller_costs_one_attempt_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two seeds; the one closest to B dies silently, its links looking
    alive. Asking one signaller at a time (alpha=1), the finder asks the
    dead one first, waits one attempt timeout, then punches through the
    other."""
    async with NatNetwork(config=QUIET, latency=L, seed=4) as net:
        with trio.fail_after(BOUND):
            s1, s2 = await net.spawn(), await net.spawn()
            await net.join(s2, [s1])
            b = await net.spawn(nat=PORT, join=[s1, s2])
            a = await net.spawn(nat=PORT, join=[s1, s2])
            for node in (a, b):
                keep_only(node, s1, s2)
            t = b.node_id.to_int()
            dead, live = sorted((s1, s2), key=lambda s: s.node_id.to_int() ^ t)
            net.kill(dead)
            finder = NodeFinder(a.manager, a.connections, alpha=1)
            attempt = a.manager.attempt_deadline()
            start = trio.current_time()
            found = await finder.connect(b.node_id)
            took = trio.current_time() - start
        assert found.path is ConnectionPath.PUNCHED
        assert took == pytest.approx(attempt + 6 * L)
        assert live.connections.signals_forwarded >= 1


# -- cancellation ------------------------------------------------------------------------


#: When to cancel, given the attempt timeout; and what had begun by then.
CANCELS: dict[str, tuple[tuple[NatType, NatType], Callable[[float], float], str]] = {
    "asking the seed": ((SYM, PORT), lambda attempt: 0.01, "ask"),
    "signalling": ((SYM, PORT), lambda attempt: 3 * L, "signal"),
    "punching in vain": ((SYM, PORT), lambda attempt: 0.5, "punch"),
    "in the relay's handshake": (
        (SYM, PORT),
        lambda attempt: 2 * L + relay_delay(attempt) + 6 * L,
        "relay",
    ),
    "a punch about to work": ((PORT, PORT), lambda attempt: 5 * L, "punch"),
}


@pytest.mark.parametrize("when", list(CANCELS))
async def test_the_callers_deadline_ends_everything(
    autojump_clock: trio.testing.MockClock, when: str
) -> None:
    pair, after, stage = CANCELS[when]
    async with NatNetwork(config=QUIET, latency=L, seed=5) as net:
        with trio.fail_after(BOUND):
            _, a, b = await two_behind_a_seed(net, *pair)
            await trio.sleep(1)  # let the joins' last tasks end
            before = count_tasks()
            links = len(net.links())
            with trio.move_on_after(after(a.manager.attempt_deadline())) as scope:
                await a.finder.connect(b.node_id)
            assert scope.cancelled_caught
            assert trio.current_time() == pytest.approx(scope.deadline)
            # It had got that far.
            assert (b.connections.punches == 1) is (stage in ("punch", "relay"))
            assert (a.connections.relayed_dials == 1) is (stage == "relay")
            assert a.connections.get(b.node_id) is None
            assert a.connections.dials_in_flight == 0
            assert not a.connections._punch_attempts
            # What the far ends started (B's punch, the seed's signal) ends
            # by its own deadline, and no link appears late.
            await trio.sleep(PUNCH_DURATION + net.rpc_timeout)
            assert count_tasks() == before
            assert len(net.links()) == links
            assert b.connections.get(a.node_id) is None


# -- links and NAT state ------------------------------------------------------------------


async def test_keepalives_hold_nat_mappings_open_and_idle_ones_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with NatNetwork(config=QUIET, latency=L, seed=6) as net:
        with trio.fail_after(BOUND):
            seed = await net.spawn()
            b = await net.spawn(nat=FULL, join=[seed])
            c = await net.spawn(nat=SYM, join=[seed])
            assert b.nat is not None
            # Long after the NATs' timeouts, live links still work.
            await trio.sleep(10 * net.established_timeout)
            for node in (b, c):
                link = node.connections.get(seed.node_id)
                assert link is not None
                assert await request_ping(link.rpc)
            a = await net.spawn(join=[seed])
            b_address = seed.connections.get(b.node_id)
            assert b_address is not None
            # A full cone lets anyone in while it has a mapping...
            keep_only(a, seed)
            link = await a.connections.connect(b.node_id, b_address.address)
            assert link.path is ConnectionPath.DIRECT
            # ...and nobody once its links are gone and the mapping expired.
            for link in b.connections.active():
                b.connections.close(link.node_id)
            await trio.sleep(net.established_timeout + 1)
            assert b.nat.mappings(trio.current_time()) == []
            with pytest.raises(Unreachable):
                await a.connections.connect(b.node_id, b_address.address)
            assert trio.current_time() > 0


async def test_a_relayed_link_ends_with_its_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with NatNetwork(config=QUIET, latency=L, seed=7) as net:
        with trio.fail_after(BOUND):
            seed, a, b = await two_behind_a_seed(net, SYM, SYM)
            link = await a.finder.connect(b.node_id)
            assert isinstance(link, SimLink)
            assert link.path is ConnectionPath.RELAYED
            assert await request_ping(link.rpc)
            net.kill(seed, mode="refuse")
            assert link.closed
            assert a.connections.get(b.node_id) is None
            assert b.connections.get(a.node_id) is None
            # Without a relay or a punch, nothing connects them.
            with pytest.raises(NodeNotFoundError):
                await a.finder.connect(b.node_id)


async def test_a_relay_behind_a_nat_does_not_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with NatNetwork(config=QUIET, latency=L, seed=8) as net:
        with trio.fail_after(BOUND):
            seed = await net.spawn(relays=False)
            b = await net.spawn(nat=SYM, join=[seed])
            a = await net.spawn(nat=PORT, join=[seed])
            with pytest.raises(NodeNotFoundError):
                await a.finder.connect(b.node_id)
            assert a.connections.relayed_dial_failures == 1


async def test_dialling_the_wrong_node_or_a_refusing_one_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with NatNetwork(config=QUIET, latency=L, seed=9) as net:
        with trio.fail_after(BOUND):
            a, b, c = [await net.spawn() for _ in range(3)]
            start = trio.current_time()
            with pytest.raises(Unreachable, match="is not"):
                await a.connections.connect(b.node_id, c.local)
            net.kill(c, mode="refuse")
            with pytest.raises(Unreachable, match="refused"):
                await a.connections.connect(c.node_id, c.local)
            assert trio.current_time() - start == pytest.approx(4 * L)
            # A private address is never routed: silence until the idle timeout.
            with pytest.raises(Unreachable, match="no answer"):
                await a.connections.connect(b.node_id, ("10.0.0.2", 1314))
            assert net.stats.unroutable > 0


async def test_fail_after_bounds_real_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A simulation that hangs hits its virtual fail_after at once in real
    time (everything waits, so MockClock jumps to the deadline); a busy loop
    that never waits would not, which is what pytest-timeout is for."""
    async with NatNetwork(config=QUIET, latency=L, idle_timeout=float("inf")) as net:
        a, b = await net.spawn(), await net.spawn(nat=PORT)
        started = time.monotonic()
        with pytest.raises(trio.TooSlowError), trio.fail_after(BOUND):
            await a.connections.connect(b.node_id, b.local)  # never answered
        assert time.monotonic() - started < 5
        assert trio.current_time() >= BOUND


async def test_any_rfc_4787_behaviour_a_restricted_cone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Behind an address-restricted cone (which Linux cannot make), B lets
    in a symmetric A's fresh port, since it punched toward A's IP."""
    cone = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT)
    async with NatNetwork(config=QUIET, latency=L, seed=10) as net:
        with trio.fail_after(BOUND):
            _, a, b = await two_behind_a_seed(net, SYM, cone)
            link = await a.finder.connect(b.node_id)
        assert link.path is ConnectionPath.PUNCHED


async def test_dials_waiting_on_a_failed_one_share_one_retry(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As NodeConnectionManager.connect (tests/nodes/test_connections.py)."""
    async with NatNetwork(config=QUIET, latency=L, seed=16) as net:
        with trio.fail_after(BOUND):
            a, b = await net.spawn(), await net.spawn()
            real_handshake = net._handshake
            calls = 0

            async def handshake(*args: Any, **kwargs: Any) -> SimLink:
                nonlocal calls
                calls += 1
                if calls == 1:
                    await trio.sleep(L)
                    raise Unreachable("the first dial fails")
                return await real_handshake(*args, **kwargs)

            monkeypatch.setattr(net, "_handshake", handshake)
            results: list[Any] = []

            async def connect() -> None:
                try:
                    results.append(
                        await a.connections.connect(b.node_id, b.address.as_tuple())
                    )
                except Unreachable as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(connect)
                    await trio.sleep(L / 10)  # the first is the one in flight
            failed, *connected = results
            assert isinstance(failed, Unreachable)
            assert len({id(c) for c in connected}) == 1
            assert a.connections.dials == calls == 2


# -- docs/testing.md's example ------------------------------------------------------------


class Hello(UnaryHandler[JSONValue, JSONValue]):
    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONValue:
        name = params.get("name") if isinstance(params, dict) else None
        # The caller, verified, as this node sees it.
        return {"hello": name, "from": str(ctx.transport["node_id"])}


async def test_hello_behind_nats(autojump_clock: trio.testing.MockClock) -> None:
    quiet = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)
    async with NatNetwork(config=quiet, latency=0.05, seed=1) as net:
        with trio.fail_after(600):  # virtual seconds
            seed = await net.spawn()  # public: it signals and relays
            server = await net.spawn(
                nat=NatType.PORT_RESTRICTED, join=[seed], handlers={"hello": Hello()}
            )
            client = await net.spawn(nat=NatType.FULL_CONE, join=[seed])
            link = await client.finder.connect(server.node_id)  # by NodeId alone
            assert link.path is ConnectionPath.PUNCHED
            answer = await link.rpc.unary("hello", {"name": "world"})
            assert answer == {"hello": "world", "from": str(client.node_id)}


# -- the signalled search's walk ------------------------------------------------------------


def identity(n: int) -> NodeIdentity:
    return NodeIdentity.generate(KeyPair.from_seed(n.to_bytes(32, "big")))


def around(target: NodeIdentity, n: int) -> list[NodeIdentity]:
    """``n`` identities, the one farthest from ``target`` first."""
    t = target.node_id.to_int()
    found = [identity(1000 + i) for i in range(n)]
    return sorted(found, key=lambda i: i.node_id.to_int() ^ t, reverse=True)


@pytest.mark.parametrize("middle", [NONE, PORT], ids=lambda t: f"middle-{t.value}")
async def test_the_signalled_search_walks_a_chain_of_signallers(
    autojump_clock: trio.testing.MockClock, middle: NatType
) -> None:
    """A holds a link to S only, B to M only, and S to M, M closer to B
    than S. Asked, S lists M; the finder reaches M (dialled, or punched
    through S when M is behind a NAT), asks it, and punches B through it."""
    b_id = identity(1)
    s_id, m_id = around(b_id, 2)
    async with NatNetwork(config=QUIET, latency=L, seed=11) as net:
        with trio.fail_after(BOUND):
            s = await net.spawn(s_id)
            m = await net.spawn(m_id, nat=middle, join=[s])
            b = await net.spawn(b_id, nat=PORT, join=[s])
            link = await b.finder.connect(m.node_id)  # B's link to M
            a = await net.spawn(nat=PORT, join=[s])
            keep_only(a, s)
            keep_only(b, m)
            keep_only(m, s, b)
            assert m.connections.get(b.node_id) is not None
            start = trio.current_time()
            link = await a.finder.connect(b.node_id)
            took = trio.current_time() - start
        assert link.path is ConnectionPath.PUNCHED
        assert m.connections.signals_forwarded >= 1  # M signalled B's punch
        assert a.finder.statistics.signallers_asked == 2
        if middle is NONE:
            # Ask S (the lookup, which knows M, has dialled it meanwhile), ask
            # M, signal, then the punch's Initial and its answer.
            assert took == pytest.approx(8 * L)


async def test_connecting_to_ourselves_is_refused_plainly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with NatNetwork(config=QUIET, latency=L, seed=12) as net:
        with trio.fail_after(BOUND):
            seed = await net.spawn()
            a = await net.spawn(join=[seed])
            with pytest.raises(OwnNodeIdError):
                await a.finder.connect(a.node_id)  # not an ExceptionGroup
        assert a.finder.statistics.connects == 0


async def test_a_mesh_of_seeds_and_nats_everyone_finds_everyone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three seeds that know each other, 18 nodes behind NATs of every type,
    each joined to one or two seeds; every node keeps only its links to its
    seeds. Then each finds every other by NodeId: through a shared seed, or
    along a chain of seeds (the walk must not stop where no seed is closer
    to the target than the last)."""
    import random

    rng = random.Random(13)
    async with NatNetwork(config=QUIET, latency=L, seed=13) as net:
        with trio.fail_after(BOUND):
            seeds = [await net.spawn()]
            for _ in range(2):
                seeds.append(await net.spawn(join=seeds[:1]))
            for s in seeds:
                for other in seeds:
                    if other is not s:
                        await s.finder.connect(other.node_id)
            nodes = []
            for i in range(18):
                mine = rng.sample(seeds, rng.choice((1, 2)))
                node = await net.spawn(nat=list(NatType)[i % 4], join=mine)
                keep_only(node, *mine)
                nodes.append(node)
            failures = []
            for a in nodes:
                for b in rng.sample(nodes, 4):
                    if b is a:
                        continue
                    try:
                        with trio.fail_after(120):
                            await a.finder.connect(b.node_id)
                    except (NodeNotFoundError, trio.TooSlowError) as exc:
                        failures.append((a.node_id, b.node_id, repr(exc)))
            assert not failures, failures
