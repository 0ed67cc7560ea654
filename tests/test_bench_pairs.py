"""bench/pairs.py still drives the benchmark peers it names (their command
lines are its contract with them): one short pair of this tree against
itself, each row's peer once."""

from __future__ import annotations

import re

import pytest

from .helpers import BENCH, run_bench


@pytest.mark.parametrize("row", ["unary64", "rr"])
def test_a_pair_runs_and_reports_its_ratio(row: str) -> None:
    out = run_bench(
        "pairs.py", str(BENCH.parent), "--row", row, "--pairs", "1",
        "--seconds", "0.3", "--no-pin",
    )  # fmt: skip
    rates = re.search(r"this tree \(.*\): ([\d,]+)", out)
    assert rates is not None, out
    assert int(rates.group(1).replace(",", "")) > 0
    assert re.search(r"median \d+\.\d{3} \(pairs", out), out
