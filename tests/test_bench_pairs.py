"""bench/pairs.py still drives the benchmark peers it names (their command
lines are its contract with them): one short pair of this tree against
itself, each row's peer once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("row", ["unary64", "rr"])
def test_a_pair_runs_and_reports_its_ratio(row: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "pairs.py"),
            str(ROOT),
            "--row",
            row,
            "--pairs",
            "1",
            "--seconds",
            "0.3",
            "--no-pin",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    rates = re.search(r"this tree \(.*\): ([\d,]+)", result.stdout)
    assert rates is not None, result.stdout
    assert int(rates.group(1).replace(",", "")) > 0
    assert re.search(r"median \d+\.\d{3} \(pairs", result.stdout), result.stdout
