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
``0.0.0.0``, and our nodes on ``::`` or ``0.0.0.0``. Each case has its own
lab and takes 6 to 10 s, mostly the agent's CPU (about 5 s of it: 1 to 2 s
to start, as long to stop, as it cancels its 256 bucket-refresh tasks one
by one), so the cases of a test run two at a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

#: Cases run at once (an agent and two or three nodes each, on 2 cores).
_CONCURRENT = 2
#: One case, lab to clean-up.
_CASE_TIMEOUT = 50

Case = TypeVar("Case", bound=tuple[Any, ...])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Short paths: a control socket's path must fit in sun_path.
    path = Path(tempfile.mkdtemp(prefix="pk-natpk-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def run_cases(
    run: Callable[[Case, Path], Awaitable[dict[str, Any]]],
    cases: Sequence[Case],
    tmp: Path,
) -> list[dict[str, Any]]:
    """``run(case, its own directory)`` for every case, a few at once."""
    results: list[dict[str, Any]] = [{} for _ in cases]
    limiter = trio.CapacityLimiter(_CONCURRENT)

    async def one(i: int) -> None:
        async with limiter:
            with trio.fail_after(_CASE_TIMEOUT):
                results[i] = await run(cases[i], tmp / str(i))

    with trio.fail_after(110):
        async with trio.open_nursery() as nursery:
            for i in range(len(cases)):
                nursery.start_soon(one, i)
    return results


async def wait_agent_connected(agent: Agent) -> None:
    """Until the agent holds at least one connection (its seed's)."""
    while (await agent.command({"op": "alive"}))["connections"] < 1:  # noqa: ASYNC110
        await trio.sleep(0.1)


async def wait_connected(node: LabNode, node_id: str) -> dict[str, Any]:
    """Until our node holds a connection with ``node_id``; its status."""
    while True:
        status = await control(node, "status")
        if node_id in {c["nodeIdEncoded"] for c in status["connections"]}:
            return status
        await trio.sleep(0.1)


def connections_with(status: dict[str, Any], node_id: str) -> list[dict[str, Any]]:
    return [c for c in status["connections"] if c["nodeIdEncoded"] == node_id]


# -- a Polykey seed signals between our nodes ------------------------------------------

#: (A's NAT, the Polykey seed's bind address, our nodes' bind address).
#: Bound to ``::`` (Polykey's default) the seed relays A's address to B as
#: ``::ffff:203.0.113.x``, signed in that form; bound to ``0.0.0.0`` as
#: plain IPv4. Our nodes bound to ``0.0.0.0`` punch a mapped address from
#: an IPv4-only socket. B is behind a port-restricted NAT in every case.
SEED_CASES = [
    (NatType.PORT_RESTRICTED, "::", "::"),
    (NatType.FULL_CONE, "::", "::"),
    (NatType.PORT_RESTRICTED, "0.0.0.0", "::"),
    (NatType.PORT_RESTRICTED, "::", "0.0.0.0"),
]


async def polykey_seed_case(
    case: tuple[NatType, str, str], tmp: Path
) -> dict[str, Any]:
    a_type, seed_bind, our_bind = case
    ours = ["--host", our_bind]
    async with NatLab([a_type, NatType.PORT_RESTRICTED]) as lab:
        a_host, b_host = lab.hosts
        async with lab_agent(lab, lab.seed, tmp / "seed", bind=seed_bind) as seed:
            seed_id = seed.info["nodeId"]
            seeds = [agent_seed(seed)]
            async with lab_node(lab, b_host, tmp / "b", seeds=seeds, extra=ours) as b:
                with trio.fail_after(20):
                    await wait_joined(b, seed_id)
                async with lab_node(
                    lab, a_host, tmp / "a", seeds=seeds, extra=ours
                ) as a:
                    with trio.fail_after(20):
                        await wait_joined(a, seed_id)
                    with trio.fail_after(30):
                        ping = await control(a, "ping", b.node_id)
                    b_status = await control(b, "status")
                    # B answered the seed's relay before it punched, long
                    # before the ping came back: the seed must live on.
                    seed_alive = seed.alive()
                    seed_connections = (await seed.command({"op": "alive"}))[
                        "connections"
                    ]
                    seed_exit = await seed.stop()
    return {
        "ping": ping,
        "b_public": [b_host.public_address, SEED_PORT],
        "b_from_a": [c["path"] for c in connections_with(b_status, a.node_id)],
        "seed_alive": seed_alive,
        "seed_connections": seed_connections,
        "seed_exit": seed_exit,
    }


async def test_a_polykey_seed_signals_a_punch_between_our_nodes(
    short_tmp: Path,
) -> None:
    results = await run_cases(polykey_seed_case, SEED_CASES, short_tmp)
    table = {
        f"{t.value} seed[{s}] ours[{o}]": r
        for (t, s, o), r in zip(SEED_CASES, results, strict=True)
    }
    print("\n".join(f"{k}: {v}" for k, v in table.items()))
    for name, r in table.items():
        ping = r["ping"]
        assert ping["success"], (name, r)
        # B's NAT filters: only a punch gets in, and both ends say so.
        assert ping["path"] == "punched", (name, r)
        assert [ping["host"], ping["port"]] == r["b_public"], (name, r)
        assert r["b_from_a"] == ["punched"], (name, r)
        # The Polykey seed relayed, got B's answer, and lives on: it still
        # answers, holds A's and B's connections, and stops cleanly.
        assert r["seed_alive"], (name, r)
        assert r["seed_connections"] >= 2, (name, r)
        assert r["seed_exit"] == 0, (name, r)


# -- our seed signals for a Polykey agent ---------------------------------------------

#: A's NAT (the agent's); B is behind a port-restricted NAT.
AGENT_CASES = [(NatType.PORT_RESTRICTED,), (NatType.FULL_CONE,)]


async def polykey_agent_case(case: tuple[NatType], tmp: Path) -> dict[str, Any]:
    (a_type,) = case
    async with NatLab([a_type, NatType.PORT_RESTRICTED]) as lab:
        a_host, b_host = lab.hosts
        async with (
            lab_node(lab, lab.seed, tmp / "seed") as seed,
            lab_node(lab, b_host, tmp / "b", seeds=[seed.seed]) as b,
        ):
            with trio.fail_after(20):
                await wait_joined(b, seed.node_id)
            async with lab_agent(lab, a_host, tmp / "a", seeds=[seed.seed]) as a:
                a_id = a.info["nodeId"]
                with trio.fail_after(20):
                    # Its one seed is its one way in: our seed.
                    await wait_agent_connected(a)
                with trio.fail_after(30):
                    found = await a.command({"op": "find", "nodeId": b.node_id})
                if found["address"] is None:
                    b_status = await control(b, "status")
                    seed_status = await control(seed, "status")
                else:
                    with trio.fail_after(10):
                        b_status = await wait_connected(b, a_id)
                    seed_status = None
                a_alive = a.alive()
                a_exit = await a.stop()
    return {
        "found": found["address"],
        "b_public": [b_host.public_address, SEED_PORT],
        "b_from_a": [
            (c["path"], c["outgoing"]) for c in connections_with(b_status, a_id)
        ],
        "a_alive": a_alive,
        "a_exit": a_exit,
        "b_status": b_status,
        "seed_status": seed_status,
    }


async def test_our_seed_signals_a_punch_for_a_polykey_agent(short_tmp: Path) -> None:
    results = await run_cases(polykey_agent_case, AGENT_CASES, short_tmp)
    table = {t.value: r for (t,), r in zip(AGENT_CASES, results, strict=True)}
    print("\n".join(f"{k}: {v}" for k, v in table.items()))
    for name, r in table.items():
        # A's findNode reached B, at B's public address as A's connection
        # sees it; B's NAT filters, so by a punch: B counts A's incoming
        # connection as the one its punch let in.
        assert r["found"] == r["b_public"], (name, r)
        assert r["b_from_a"] == [("punched", False)], (name, r)
        assert r["a_alive"], (name, r)
        assert r["a_exit"] == 0, (name, r)
