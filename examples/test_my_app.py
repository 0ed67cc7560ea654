"""A deterministic test of an application under trio's MockClock.

Run it: ``.venv/bin/python -m pytest examples/test_my_app.py``. The
"application" is a counter service that remembers how often each caller
called; the test runs it on simulated nodes behind NATs
(``polykey.testing.NatNetwork``): the real node code, a simulated network,
virtual time. It takes milliseconds, and the same every run.
"""

from __future__ import annotations

import trio
import trio.testing

from polykey.nodes import ConnectionPath, NodeManagerConfig
from polykey.rpc import CallContext, JSONValue, UnaryHandler
from polykey.testing import NatNetwork, NatType


class Counter(UnaryHandler[JSONValue, JSONValue]):
    """Counts calls per verified caller."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def handle(self, params: JSONValue, ctx: CallContext) -> JSONValue:
        caller = str(ctx.transport["node_id"])
        self.counts[caller] = self.counts.get(caller, 0) + 1
        return {"count": self.counts[caller]}


async def test_counts_per_caller_through_nats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    quiet = NodeManagerConfig(refresh_interval=None, self_lookup_interval=None)
    counter = Counter()
    async with NatNetwork(config=quiet, latency=0.05, seed=7) as net:
        with trio.fail_after(600):  # virtual seconds
            seed = await net.spawn()
            service = await net.spawn(
                nat=NatType.PORT_RESTRICTED, join=[seed], handlers={"count": counter}
            )
            alice = await net.spawn(nat=NatType.FULL_CONE, join=[seed])
            bob = await net.spawn(nat=NatType.SYMMETRIC, join=[seed])
            for caller, path in (
                (alice, ConnectionPath.PUNCHED),
                (bob, ConnectionPath.RELAYED),
            ):
                link = await caller.finder.connect(service.node_id)
                assert link.path is path
                for expected in (1, 2):
                    assert await link.rpc.unary("count", {}) == {"count": expected}
            assert counter.counts == {str(alice.node_id): 2, str(bob.node_id): 2}
