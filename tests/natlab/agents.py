"""Polykey 1.15.1 agents (npm) in a NAT lab's hosts.

:func:`lab_agent` runs ``tests/interop/polykey/agent.mjs`` in one of the
lab's hosts (``ip netns exec``), listening on all of the host's addresses
(``::`` by default, Polykey's own default, dual stack: IPv4 peers show up
to it as ``::ffff:a.b.c.d``), its log in ``<node_path>.log``. It yields the
:class:`~tests.interop.polykey.agents.Agent`, whose ``command`` runs the
agent's own ``find``; :func:`agent_seed` is how our nodes name it as a
seed. :func:`agents_available` says why agents cannot run, if they cannot.

Nothing in a lab host needs setting up for an agent: each host namespace
has its loopback up (IPv4 and IPv6) and its one IPv4 address, which is
all a socket bound to ``::`` or ``0.0.0.0`` needs. The agent's mDNS binds
in its host's namespace; its multicast reaches the hosts on the same link
(the public bridge, for the seed and hosts without NAT), never a host
behind a router.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from ..interop.polykey.agents import HERE as AGENT_DIR
from ..interop.polykey.agents import Agent, running_agent
from .lab import SEED_ADDRESS, Host, NatLab

__all__ = ["Agent", "agent_seed", "agents_available", "lab_agent"]


def agents_available() -> tuple[bool, str]:
    """(True, "") if agent.mjs can run, else (False, the reason)."""
    if shutil.which("node") is None:
        return False, "node is not installed"
    if not (AGENT_DIR / "node_modules" / "polykey").is_dir():
        return False, "polykey from npm is not installed (make test installs it)"
    return True, ""


def agent_seed(agent: Agent, address: str = SEED_ADDRESS) -> str:
    """The agent as a ``--seed`` value, at ``address`` (it listens on a
    wildcard, which is no address to dial)."""
    return f"{agent.info['nodeId']}@{address}:{agent.address[1]}"


@asynccontextmanager
async def lab_agent(
    lab: NatLab,
    host: Host,
    node_path: Path,
    *,
    seeds: Sequence[str] = (),
    bind: str = "::",
    log_level: str = "warn",
) -> AsyncIterator[Agent]:
    """A Polykey agent in ``host``, stopped (stdin closed) on the way out.

    Failing to start raises RuntimeError with the tail of its log."""
    log_path = node_path.with_suffix(".log")
    node_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: ASYNC230, SIM115 - closed below
    started = False
    try:
        try:
            async with running_agent(
                node_path,
                seeds,
                options=[f"--host={bind}", f"--log-level={log_level}"],
                argv_prefix=lab.exec_argv(host, []),
                stderr=log,
            ) as agent:
                started = True
                yield agent
        except RuntimeError as exc:
            if started:
                raise
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"the agent in {host.label} failed: {exc}\n{tail}"
            ) from exc
    finally:
        log.close()
