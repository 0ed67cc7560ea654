"""bench/critical_path.py's probe still finds what it marks, and its
timeline puts a call's steps in their order.

The probe wraps methods by name (bench/_probe.py's MARKS): a rename in
polykey would make it fail at start, or mark nothing, without this test.
"""

from __future__ import annotations

import re

from ..helpers import run_bench


def test_every_mark_of_the_probe_resolves() -> None:
    run_bench("_probe.py", "--check", timeout=60)


def test_a_short_run_shows_each_side_up_to_its_send() -> None:
    out = run_bench("critical_path.py", "--seconds", "0.5", "--no-pin")
    client_block, server_block = out.split("\nserver: ", 1)
    for block in (client_block, server_block):
        steps = [
            re.sub(r"  \(.*\)$", "", line.split(None, 1)[1])
            for line in block.splitlines()[1:]
            if line.startswith(" ")
        ]
        # The reader runs, quiche takes the datagram, a send ends the chain.
        read = steps.index("task step: _reader")
        taken = steps.index("QUICConnection.datagram_received")
        assert read < taken < steps.index("sendto called"), block
    # The server hands the stream to RPC before its call task decodes it.
    assert server_block.index("RPCServer.handle_stream_nowait") < server_block.index(
        "task step: _run_call"
    ), server_block
    assert re.search(r"unary: [\d,]+ round trips/s", out), out
