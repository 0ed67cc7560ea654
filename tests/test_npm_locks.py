"""Every npm lock in the repository installs with ``npm ci`` on a fresh
machine: a lock written on one platform lacks the entries of the other
platforms' optional @matrixai/quic binaries, and ``npm ci`` then refuses it
("Missing: @matrixai/quic-darwin-arm64@ from lock file"), as bench/js's did.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCKS = sorted(
    p for p in ROOT.glob("**/package-lock.json") if "node_modules" not in p.parts
)


def test_the_locks_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in LOCKS}
    assert {
        "bench/js/package-lock.json",
        "tests/interop/quic/package-lock.json",
    } <= names


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_optional_dependency_has_an_entry(lock: Path) -> None:
    packages = json.loads(lock.read_text())["packages"]
    missing = [
        f"{name} (optional dependency of {path})"
        for path, entry in packages.items()
        for name in entry.get("optionalDependencies", {})
        if f"node_modules/{name}" not in packages
        and f"{path}/node_modules/{name}" not in packages
    ]
    assert not missing, missing
