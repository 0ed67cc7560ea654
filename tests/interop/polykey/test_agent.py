"""Interoperability with Polykey's own agent (the npm package polykey 1.15.1).

Both nodes run in a private network namespace (the agent's mDNS binds on
every interface and cannot be turned off), so this needs root and the npm
package that `make test` installs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.interop,
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (HERE / "node_modules" / "polykey").is_dir(),
        reason="polykey from npm is not installed (make test installs it)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare for a private network namespace",
    ),
]


def run_in_namespace(script: str, state_dir: Path, *, timeout: float) -> Any:
    """Run ``script`` (a module beside this file) in a private network
    namespace; its last stdout line is a JSON report."""
    module = f"tests.interop.polykey.{script.removesuffix('.py')}"
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", module, str(state_dir)],
        cwd=HERE.parents[2],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_our_node_and_a_polykey_agent_dial_each_other_and_talk_rpc(
    tmp_path: Path,
) -> None:
    report = run_in_namespace("agent_interop.py", tmp_path, timeout=150)
    # The agent dialled us (it had us as its seed): its QUIC client accepted
    # our node certificate and ours accepted its.
    assert report["agent_dialled_us"]
    # We dialled the agent with its NodeId pinned.
    assert report["we_dialled_agent"]
    assert report["agent_chain_length"] >= 1
    # Its nodesClosestLocalNodesGet (js-rpc over js-quic) answered over our
    # QUIC stream; its graph holds us, as it saw us connect.
    assert [entry["nodeIdEncoded"] for entry in report["closest"]] == [report["ours"]]
    assert report["agent_exit"] == 0


def test_a_polykey_seed_survives_signalling_through_our_node(tmp_path: Path) -> None:
    """A Polykey agent seeds our node and a second agent: the seed forwards
    the second agent's signals to our node and must survive our answer (it
    crashed, 3 runs of 3, when we answered an unknown method with a JSON
    error); then everyone finds everyone."""
    report = run_in_namespace("three_peers.py", tmp_path, timeout=170)
    assert report["ours_joined"], report
    assert report["s_alive_after_p_joined"], report
    assert report["s_alive_at_end"], report
    addresses = report["addresses"]
    assert report["p_found_ours"] == addresses["ours"], report
    assert report["s_found_ours"] == addresses["ours"], report
    assert report["ours_found_s"] == addresses["s"], report
    assert report["ours_found_p"] == addresses["p"], report
    assert report["s_exit"] == 0, report
    assert report["p_exit"] == 0, report
