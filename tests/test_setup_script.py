"""scripts/setup.sh decides what to install from what bindgen can load.

A machine with only libclang-cpp (the C++ interface, which bindgen cannot
use) once passed its check and then failed the quiche build; these run the
script's own probe (``--plan``) against fake filesystem layouts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"


def plan(sysroot: Path) -> list[str]:
    """The system packages setup.sh would install with ``sysroot`` as /."""
    result = subprocess.run(
        ["bash", str(SETUP), "--plan", "node"],
        env={
            "PATH": "/usr/bin:/bin",
            "PK_SYSROOT": str(sysroot),
            "HOME": "/nonexistent",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.split()


def layout(root: Path, *files: str) -> Path:
    for name in files:
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF")
    return root


@pytest.mark.parametrize(
    "files",
    [
        (),
        ("/usr/lib/llvm-14/lib/libclang-cpp.so.14",),
        ("/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", "/usr/lib/libclangBasic.a"),
    ],
    ids=["nothing", "libclang-cpp-only", "cpp-and-static"],
)
def test_no_loadable_libclang_means_install(
    tmp_path: Path, files: tuple[str, ...]
) -> None:
    assert "libclang-dev" in plan(layout(tmp_path, *files))


@pytest.mark.parametrize(
    "name",
    [
        "/usr/lib/llvm-14/lib/libclang-14.so.1",
        "/usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "/usr/lib/llvm-16/lib/libclang.so",
        "/usr/lib/llvm-16/lib/libclang.so.16",
        "/usr/local/lib/libclang-17.0.6.so",
    ],
)
def test_a_loadable_libclang_is_enough(tmp_path: Path, name: str) -> None:
    root = layout(tmp_path, "/usr/lib/llvm-14/lib/libclang-cpp.so.14", name)
    assert "libclang-dev" not in plan(root)


def test_check_reports_each_tool() -> None:
    result = subprocess.run(
        ["bash", str(SETUP), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for tool in ("python3", "cargo", "cmake", "libclang", "iptables", "node"):
        assert f"  {tool} " in result.stdout, result.stdout
    # This machine ran make test, so everything is there.
    assert result.returncode == 0, result.stdout
