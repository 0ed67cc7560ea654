"""The NAT lab behaves as its docstring says, shown with plain UDP sockets.

Every probe is tests/natlab/udp_probe.py run in a lab namespace: the seed's
mapping service (``serve``) or an agent with one socket driven over stdin.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.natlab.lab import (
    PREFIX,
    SEED_ADDRESS,
    Host,
    NatLab,
    NatType,
    can_hole_punch,
    cleanup_stale,
    lab_available,
)

AVAILABLE, WHY_NOT = lab_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROBE = str(HERE / "udp_probe.py")
MAP_PORT, MAP_PORT2 = 3478, 3479
SENDER_PORT = 4000

ALL = (NatType.NONE, NatType.FULL_CONE, NatType.PORT_RESTRICTED, NatType.SYMMETRIC)
Addr = tuple[str, int]


class Probe:
    """A udp_probe.py process: JSON lines in, JSON lines out."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise EOFError(f"probe exited ({self.process.returncode})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def ask(self, **command: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        return await self.line()


@asynccontextmanager
async def probe(lab: NatLab, host: Host, *args: str) -> AsyncIterator[Probe]:
    """Run udp_probe.py with args in host's namespace for the block."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                lab.exec_argv(host, [sys.executable, PROBE, *args]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        try:
            yield Probe(process)
        finally:
            # Closing stdin ends a probe; cancelling run_process kills a stuck one.
            assert process.stdin is not None
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await process.stdin.aclose()
                await process.wait()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def mapping_service(lab: NatLab, *ports: int) -> AsyncIterator[None]:
    async with probe(lab, lab.seed, "serve", *map(str, ports)) as seed:
        assert (await seed.line()) == {"ready": True}
        yield


def addr(value: Sequence[Any]) -> Addr:
    return (str(value[0]), int(value[1]))


def lab_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"{prefix}-")]


async def test_every_host_reaches_the_seed_from_the_source_its_nat_gives() -> None:
    with trio.fail_after(30):
        async with NatLab(ALL) as lab, mapping_service(lab, MAP_PORT, MAP_PORT2):
            seeds = [[SEED_ADDRESS, MAP_PORT], [SEED_ADDRESS, MAP_PORT2]]
            results: dict[NatType, dict[str, Any]] = {}

            async def ask(host: Host) -> None:
                async with probe(lab, host, "agent") as agent:
                    results[host.nat] = await agent.ask(op="map", seeds=seeds)

            async with trio.open_nursery() as nursery:
                for host in lab.hosts:
                    nursery.start_soon(ask, host)

    for host in lab.hosts:
        local = results[host.nat]["local"]
        mapped = [addr(m) for m in results[host.nat]["mapped"]]
        assert [ip for ip, _ in mapped] == [host.public_address] * 2, host
        if host.nat is NatType.NONE:
            assert host.address == host.public_address
            assert mapped == [(host.address, local)] * 2
        elif host.nat in (NatType.FULL_CONE, NatType.PORT_RESTRICTED):
            # Endpoint-independent mapping, the host's port kept.
            assert host.address.startswith("10.0.")
            assert mapped == [(host.public_address, local)] * 2, host
        else:
            # A new mapping (random port) for each destination.
            assert mapped[0][1] != mapped[1][1], mapped


async def test_unsolicited_udp_reaches_only_hosts_without_filtering() -> None:
    """The seed sends from a port the host never talked to: a full cone (and
    no NAT) lets it in, port-restricted and symmetric drop it. Once the host
    has sent to that port, its answer to the source it saw arrives everywhere,
    so the drop was filtering and not a broken path."""
    with trio.fail_after(30):
        async with (
            NatLab(ALL) as lab,
            mapping_service(lab, MAP_PORT),
            probe(lab, lab.seed, "agent", "--port", str(SENDER_PORT)) as sender,
            trio.open_nursery() as nursery,
        ):
            agents: dict[NatType, Probe] = {}
            mapped: dict[NatType, Addr] = {}
            unsolicited: dict[NatType, set[Addr]] = {}
            solicited: dict[NatType, set[Addr]] = {}

            async def run_agent(
                host: Host,
                *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                async with probe(lab, host, "agent") as agent:
                    reply = await agent.ask(op="map", seeds=[[SEED_ADDRESS, MAP_PORT]])
                    mapped[host.nat] = addr(reply["mapped"][0])
                    agents[host.nat] = agent
                    task_status.started()
                    await trio.sleep_forever()

            for host in lab.hosts:
                await nursery.start(run_agent, host)

            async def listen(nat: NatType, into: dict[NatType, set[Addr]]) -> None:
                reply = await agents[nat].ask(op="listen", seconds=1.5)
                into[nat] = {addr(g) for g in reply["got"]}

            # Phase 1: unsolicited, to each mapped address.
            async with trio.open_nursery() as phase:
                for nat in ALL:
                    phase.start_soon(listen, nat, unsolicited)
                await trio.sleep(0.2)
                for _ in range(3):
                    for nat in ALL:
                        await sender.ask(op="send", to=list(mapped[nat]))
                    await trio.sleep(0.1)

            # Phase 2: each host sends to the sender, which answers the source
            # it saw.
            heard: dict[str, Any] = {}

            async def sender_listen() -> None:
                heard.update(await sender.ask(op="listen", seconds=1.0))

            async with trio.open_nursery() as phase:
                phase.start_soon(sender_listen)
                await trio.sleep(0.2)
                for nat in ALL:
                    await agents[nat].ask(op="send", to=[SEED_ADDRESS, SENDER_PORT])
            sources = {addr(g) for g in heard["got"]}
            async with trio.open_nursery() as phase:
                for nat in ALL:
                    phase.start_soon(listen, nat, solicited)
                await trio.sleep(0.2)
                for source in sources:
                    await sender.ask(op="send", to=list(source))
            nursery.cancel_scope.cancel()

    from_sender = {(SEED_ADDRESS, SENDER_PORT)}
    assert unsolicited == {
        NatType.NONE: from_sender,
        NatType.FULL_CONE: from_sender,
        NatType.PORT_RESTRICTED: set(),
        NatType.SYMMETRIC: set(),
    }
    assert solicited == dict.fromkeys(ALL, from_sender)
    assert {ip for ip, _ in sources} == {h.public_address for h in lab.hosts}
    by_ip = dict(sources)
    for host in lab.hosts:
        # The mapping the sender saw: the same one the seed saw, except for
        # symmetric (a new destination, a new port).
        same = by_ip[host.public_address] == mapped[host.nat][1]
        assert same is (host.nat is not NatType.SYMMETRIC), host


async def punch_pair(
    lab: NatLab, first: Host, second: Host, *, stagger: float = 0.2
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each side learns its mapping from the seed, then both punch at the
    other's; the second starts ``stagger`` s later, so the first side's
    punches reach the second's router before the second has sent anything."""
    async with (
        probe(lab, first, "agent") as one,
        probe(lab, second, "agent") as two,
    ):
        seed = [[SEED_ADDRESS, MAP_PORT]]
        one_at = (await one.ask(op="map", seeds=seed))["mapped"][0]
        two_at = (await two.ask(op="map", seeds=seed))["mapped"][0]
        results: list[dict[str, Any]] = [{}, {}]

        async def go(i: int, agent: Probe, peer: object, delay: float) -> None:
            me, them = ("1", "2") if i == 0 else ("2", "1")
            results[i] = await agent.ask(
                op="punch", peer=peer, me=me, them=them, delay=delay, seconds=3.0
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(go, 0, one, two_at, 0.0)
            nursery.start_soon(go, 1, two, one_at, stagger)
    return results[0], results[1]


async def test_udp_hole_punch_works_for_13_of_the_16_ordered_pairs() -> None:
    """All 16 ordered pairs at once, in one lab with two hosts of each type
    (each punch on its own sockets, so on its own NAT mappings)."""
    pairs = list(itertools.product(ALL, ALL))
    cannot = {
        (NatType.SYMMETRIC, NatType.PORT_RESTRICTED),
        (NatType.PORT_RESTRICTED, NatType.SYMMETRIC),
        (NatType.SYMMETRIC, NatType.SYMMETRIC),
    }
    assert {p for p in pairs if not can_hole_punch(*p)} == cannot
    outcome: dict[tuple[NatType, NatType], tuple[dict[str, Any], dict[str, Any]]] = {}
    with trio.fail_after(60):
        async with NatLab(ALL + ALL) as lab, mapping_service(lab, MAP_PORT):
            first = dict(zip(ALL, lab.hosts[:4], strict=True))
            second = dict(zip(ALL, lab.hosts[4:], strict=True))

            async def run(pair: tuple[NatType, NatType]) -> None:
                outcome[pair] = await punch_pair(lab, first[pair[0]], second[pair[1]])

            async with trio.open_nursery() as nursery:
                for pair in pairs:
                    nursery.start_soon(run, pair)

    table = {
        f"{a.value}->{b.value}": (one["ok"], two["ok"])
        for (a, b), (one, two) in outcome.items()
    }
    expected = {f"{a.value}->{b.value}": ((a, b) not in cannot,) * 2 for a, b in pairs}
    assert table == expected
    for pair in cannot:
        # Not a near miss: not one datagram got through either way.
        assert [side["seen"] for side in outcome[pair]] == [None, None], pair


async def test_without_the_cpe_filter_an_early_punch_spoils_port_restricted() -> None:
    """The reason for the routers' stateful filter: without it, the first
    side's early punch leaves a conntrack entry on the second's router, whose
    NAT then maps the second host to another port, and the punch fails."""
    pr = [NatType.PORT_RESTRICTED, NatType.PORT_RESTRICTED]
    with trio.fail_after(30):
        async with (
            NatLab(pr, stateful_filter=False) as bare,
            mapping_service(bare, MAP_PORT),
        ):
            without = await punch_pair(bare, *bare.hosts)
        async with NatLab(pr) as lab, mapping_service(lab, MAP_PORT):
            with_filter = await punch_pair(lab, *lab.hosts)
    assert [side["ok"] for side in without] == [False, False]
    assert [side["ok"] for side in with_filter] == [True, True]


def test_cleanup_after_an_exception_kills_and_deletes_everything() -> None:
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="inside the lab"),
        NatLab([NatType.PORT_RESTRICTED, NatType.NONE]) as lab,
    ):
        prefix = lab.prefix
        assert sorted(lab_namespaces(prefix)) == sorted(lab.namespaces)
        host = lab.hosts[0]
        assert host.router is not None
        sleeper = subprocess.Popen(lab.exec_argv(host, ["sleep", "60"]))
        router_sleeper = subprocess.Popen(lab.exec_argv(host.router, ["sleep", "60"]))
        raise RuntimeError("inside the lab")
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert router_sleeper.wait(timeout=5) == -signal.SIGTERM
    assert lab_namespaces(prefix) == []
    lab.cleanup()  # idempotent
    assert lab_namespaces(prefix) == []


async def test_async_cleanup_after_an_exception() -> None:
    with trio.fail_after(20):
        with pytest.raises(RuntimeError, match="inside the lab"):  # noqa: PT012
            async with NatLab([NatType.SYMMETRIC]) as lab:
                prefix = lab.prefix
                assert len(lab_namespaces(prefix)) == 4
                sleeper = await trio.lowlevel.open_process(
                    lab.exec_argv(lab.hosts[0], ["sleep", "60"])
                )
                raise RuntimeError("inside the lab")
        assert await sleeper.wait() == -signal.SIGTERM
    assert lab_namespaces(prefix) == []


_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, time
    sys.path.insert(0, {repo!r})
    from tests.natlab.lab import NatLab, NatType

    def body(lab):
        sleeper = subprocess.Popen(lab.exec_argv(lab.hosts[0], ["sleep", "60"]))
        print(lab.prefix, sleeper.pid, flush=True)

    if sys.argv[1] == "sync":
        with NatLab([NatType.FULL_CONE]) as lab:
            body(lab)
            time.sleep(60)
    elif sys.argv[1] == "atexit":
        lab = NatLab([NatType.FULL_CONE])
        lab.start()
        body(lab)
        sys.stdin.readline()
        sys.exit(3)
    else:
        import trio

        async def main():
            async with NatLab([NatType.FULL_CONE]) as lab:
                body(lab)
                await trio.sleep(60)

        trio.run(main)
    """
)


@pytest.mark.parametrize("mode", ["sync", "trio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_script_killed_by_a_signal_leaves_nothing(
    mode: str, sig: signal.Signals
) -> None:
    script = _SCRIPT.format(repo=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", script, mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        prefix, sleeper = child.stdout.readline().split()
        assert len(lab_namespaces(prefix)) == 4  # inet, seed, host, router
        child.send_signal(sig)
        code = child.wait(timeout=20)
        left = lab_namespaces(prefix)
    finally:
        child.kill()
        child.wait()
        cleanup_stale()  # should this test fail, leave nothing behind
    # Died of the signal, as it would have without the lab (Python re-raises
    # an uncaught KeyboardInterrupt as SIGINT).
    assert code == -sig
    assert left == []
    assert not Path(f"/proc/{sleeper}").exists() or _is_zombie(int(sleeper))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_cleanup_stale_removes_only_labs_of_dead_creators() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-0-inet"
    live = f"{PREFIX}{os.getpid()}-9999-inet"
    other = f"natlab-test-{os.getpid()}"
    try:
        for ns in (stale, live, other):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
        removed = cleanup_stale()
        assert stale in removed
        assert live not in removed
        assert other not in removed
        names = lab_namespaces(PREFIX.rstrip("-")) + lab_namespaces("natlab-test")
        assert stale not in names
        assert live in names
        assert other in names
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        for ns in (stale, live, other):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_a_script_that_exits_without_leaving_the_lab_leaves_nothing() -> None:
    script = _SCRIPT.format(repo=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", script, "atexit"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        prefix, sleeper = child.stdout.readline().split()
        assert len(lab_namespaces(prefix)) == 4
        child.stdin.close()  # the script exits: atexit cleans up
        code = child.wait(timeout=20)
        left = lab_namespaces(prefix)
    finally:
        child.kill()
        child.wait()
        cleanup_stale()
    assert code == 3
    assert left == []
    assert not Path(f"/proc/{sleeper}").exists() or _is_zombie(int(sleeper))
