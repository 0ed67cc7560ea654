"""Hole punching across real NATs with Polykey 1.15.1 agents (npm) as peers.

Both halves of the signalling meet Polykey's over real NATs:

* a Polykey agent as the public seed signals a punch between two of our
  nodes: our B joins it from behind a port-restricted NAT, our A from
  behind another NAT, and A reaches B by NodeId alone. B's NAT filters, so
  only a punch gets in: the path must be "punched". The agent relays our
  signal (nodesConnectionSignalFinal) and must survive what B answers;
* our node as the public seed signals a punch for a Polykey agent: our B
  joins it from behind a port-restricted NAT, an agent A from behind
  another NAT, and A's own ``findNode`` (findNodeBySignal) finds B through
  our seed's nodesClosestActiveConnectionsGet and nodesConnectionSignalInitial;
  our seed relays to B, B punches toward A, and A's dial gets through.

A is behind a port-restricted or a full-cone NAT; the agent seed listens
on ``::`` (Polykey's default: it relays A's address as ``::ffff:...``) or
``0.0.0.0``, and our nodes on ``::`` or ``0.0.0.0``. Each case takes 6 to
10 s (an agent takes 1 to 2 s to start and as long to stop: it cancels
its 256 bucket-refresh tasks one by one).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from .agents import Agent, agent_seed, agents_available, lab_agent
from .lab import NatLab, NatType, lab_available
from .nodes import SEED_PORT, LabNode, control, lab_node, wait_joined

available, why = lab_available()
agents_ok, agents_why = agents_available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.interop,
    pytest.mark.skipif(not available, reason=why),
    pytest.mark.skipif(not agents_ok, reason=agents_why),
]

#: Sides for A in front of B behind a port-restricted NAT: each needs a
#: punch (B filters), and each can be punched (lab.can_hole_punch).
A_SIDES = [NatType.PORT_RESTRICTED, NatType.FULL_CONE]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Short paths: a control socket's path must fit in sun_path.
    path = Path(tempfile.mkdtemp(prefix="pk-natpk-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def wait_agent_connected(agent: Agent) -> None:
    """Until the agent holds at least one connection (its seed's)."""
    while (await agent.command({"op": "alive"}))["connections"] < 1:  # noqa: ASYNC110
        await trio.sleep(0.1)


async def wait_connected(node: LabNode, node_id: str) -> None:
    """Until our node holds a connection with ``node_id``."""
    while True:
        status = await control(node, "status")
        if node_id in {c["nodeIdEncoded"] for c in status["connections"]}:
            return
        await trio.sleep(0.1)


#: (A's NAT, the Polykey seed's bind address, our nodes' bind address).
#: Bound to ``::`` (Polykey's default) the seed relays A's address to B as
#: ``::ffff:203.0.113.x``, signed in that form; bound to ``0.0.0.0`` as
#: plain IPv4. Our nodes bound to ``0.0.0.0`` punch a mapped address from
#: an IPv4-only socket.
SEED_CASES = [
    (NatType.PORT_RESTRICTED, "::", "::"),
    (NatType.FULL_CONE, "::", "::"),
    (NatType.PORT_RESTRICTED, "0.0.0.0", "::"),
    (NatType.PORT_RESTRICTED, "::", "0.0.0.0"),
]


@pytest.mark.parametrize(
    ("a_type", "seed_bind", "our_bind"),
    SEED_CASES,
    ids=[f"{t.value}-seed[{s}]-ours[{o}]" for t, s, o in SEED_CASES],
)
async def test_a_polykey_seed_signals_a_punch_between_our_nodes(
    a_type: NatType, seed_bind: str, our_bind: str, short_tmp: Path
) -> None:
    ours = ["--host", our_bind]
    with trio.fail_after(50):
        async with NatLab([a_type, NatType.PORT_RESTRICTED]) as lab:
            a_host, b_host = lab.hosts
            async with lab_agent(
                lab, lab.seed, short_tmp / "seed", bind=seed_bind
            ) as seed:
                seed_id = seed.info["nodeId"]
                seeds = [agent_seed(seed)]
                async with lab_node(
                    lab, b_host, short_tmp / "b", seeds=seeds, extra=ours
                ) as b:
                    with trio.fail_after(20):
                        await wait_joined(b, seed_id)
                    async with lab_node(
                        lab, a_host, short_tmp / "a", seeds=seeds, extra=ours
                    ) as a:
                        with trio.fail_after(20):
                            await wait_joined(a, seed_id)
                        with trio.fail_after(30):
                            result = await control(a, "ping", b.node_id)
                        b_status = await control(b, "status")
                        # B answered the seed's relay before it punched, long
                        # before the ping came back: the seed lives on.
                        assert seed.alive(), "the Polykey seed died"
                        alive = await seed.command({"op": "alive"})
                        seed_exit = await seed.stop()
    assert seed_exit == 0, seed_exit
    assert result["success"], (result, b_status)
    # B's NAT filters: only a punch gets in.
    assert result["path"] == "punched", (result, b_status)
    assert (result["host"], result["port"]) == (b_host.public_address, SEED_PORT)
    from_a = [c for c in b_status["connections"] if c["nodeIdEncoded"] == a.node_id]
    assert [c["path"] for c in from_a] == ["punched"], b_status
    assert alive["connections"] >= 2, alive  # A's and B's


@pytest.mark.parametrize("a_type", A_SIDES, ids=lambda t: t.value)
async def test_our_seed_signals_a_punch_for_a_polykey_agent(
    a_type: NatType, short_tmp: Path
) -> None:
    with trio.fail_after(50):
        async with NatLab([a_type, NatType.PORT_RESTRICTED]) as lab:
            a_host, b_host = lab.hosts
            async with (
                lab_node(lab, lab.seed, short_tmp / "seed") as seed,
                lab_node(lab, b_host, short_tmp / "b", seeds=[seed.seed]) as b,
            ):
                with trio.fail_after(20):
                    await wait_joined(b, seed.node_id)
                async with lab_agent(
                    lab, a_host, short_tmp / "a", seeds=[seed.seed]
                ) as a:
                    a_id = a.info["nodeId"]
                    with trio.fail_after(20):
                        await wait_agent_connected(a)
                        await wait_connected(seed, a_id)
                    with trio.fail_after(30):
                        found = await a.command({"op": "find", "nodeId": b.node_id})
                    with trio.fail_after(10):
                        if found["address"] is not None:
                            await wait_connected(b, a_id)
                    b_status = await control(b, "status")
                    seed_status = await control(seed, "status")
                    assert a.alive(), "the Polykey agent died"
                    a_exit = await a.stop()
    assert a_exit == 0, a_exit
    # A's findNode reached B (by a punch: B's NAT filters), at B's public
    # address as A's connection sees it.
    assert found["address"] == [b_host.public_address, SEED_PORT], (
        found,
        b_status,
        seed_status,
    )
    from_a = [c for c in b_status["connections"] if c["nodeIdEncoded"] == a_id]
    assert [(c["path"], c["outgoing"]) for c in from_a] == [("punched", False)], (
        b_status
    )
