"""DialGate: one attempt to reach a node at a time, shared by the callers
that arrive meanwhile (the rule of both NodeConnectionManager and the
simulated network's connections)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from polykey.keys import NodeId
from polykey.nodes import DialGate

A, B = NodeId(bytes(32)), NodeId(bytes([1]) * 32)


async def test_callers_meanwhile_share_the_attempt_in_flight() -> None:
    gate = DialGate()
    pool: dict[NodeId, str] = {}
    attempts: list[str] = []
    results: list[str] = []
    release = trio.Event()

    async def connect(name: str) -> None:
        got = await gate.turn(A, lambda: pool.get(A))
        if got is None:
            with gate.attempt(A):
                attempts.append(name)
                await release.wait()
                pool[A] = got = f"conn-of-{name}"
        results.append(got)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("first", "second", "third"):
                nursery.start_soon(connect, name)
            await trio.testing.wait_all_tasks_blocked()
            assert A in gate
            assert B not in gate
            assert len(gate) == 1
            release.set()
    [attempter] = attempts
    assert results == [f"conn-of-{attempter}"] * 3
    assert A not in gate


async def test_after_a_failed_attempt_one_waiter_tries_the_others_wait_for_it() -> None:
    gate: DialGate = DialGate()
    pool: dict[NodeId, str] = {}
    attempts: list[str] = []
    fail_first = trio.Event()

    async def connect(name: str) -> str | None:
        got = await gate.turn(A, lambda: pool.get(A))
        if got is not None:
            return got
        with gate.attempt(A):
            attempts.append(name)
            if len(attempts) == 1:
                await fail_first.wait()
                raise OSError("unreachable")
            await trio.sleep(0.01)
            pool[A] = f"conn-of-{name}"
            return pool[A]

    results: list[str | None] = []

    async def caller(name: str) -> None:
        try:
            results.append(await connect(name))
        except OSError:
            results.append(None)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("first", "second", "third"):
                nursery.start_soon(caller, name)
            await trio.testing.wait_all_tasks_blocked()
            fail_first.set()
    failed, retried = attempts
    assert failed != retried
    assert sorted(results, key=str) == [None, f"conn-of-{retried}", f"conn-of-{retried}"]


async def test_an_attempt_inside_another_marks_nothing() -> None:
    gate = DialGate()
    with gate.attempt(A):
        with gate.attempt(A):
            assert A in gate
        assert A in gate  # the inner block's end does not end the outer attempt
    assert A not in gate
    with pytest.raises(KeyError), gate.attempt(B):
        raise KeyError("the mark goes whatever ends the block")
    assert B not in gate
    await trio.lowlevel.checkpoint()
