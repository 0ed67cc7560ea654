"""The packages' API is their ``__init__``, as in trio: every implementation
module of polykey's subpackages (quic, nodes, rpc, keys, testing) is private,
and every name a package exports exists."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import polykey.keys
import polykey.nodes
import polykey.quic
import polykey.rpc
import polykey.testing

PACKAGES = [polykey.quic, polykey.nodes, polykey.rpc, polykey.keys, polykey.testing]
SUBPACKAGES = [p.__name__.split(".")[1] for p in PACKAGES]
ROOT = Path(__file__).parent.parent


def _modules(package: ModuleType) -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_no_public_implementation_module(package: ModuleType) -> None:
    public = [name for name in _modules(package) if not name.startswith("_")]
    assert public == [], f"import these from {package.__name__} itself"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_resolves(package: ModuleType) -> None:
    exported = package.__all__
    assert len(exported) == len(set(exported))
    missing = [name for name in exported if not hasattr(package, name)]
    assert missing == []


@pytest.mark.parametrize(
    "module",
    [f"{p.__name__}.{m}" for p in PACKAGES for m in _modules(p) if m != "_quiche"],
)
def test_every_private_modules_all_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in getattr(mod, "__all__", []) if not hasattr(mod, name)]
    assert missing == []


def _package_of(path: Path, root: Path) -> list[str]:
    """The dotted package ``path`` is in, as a list of names."""
    return list(path.relative_to(root).parent.parts)


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Imports in ``path`` of a private module of one of polykey's
    subpackages other than the one ``path`` belongs to (absolute or
    relative): a subpackage's modules may use each other, nobody else may."""
    here = _package_of(path, root)
    own = here[1] if here[:1] == ["polykey"] and len(here) > 1 else None
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".") if node.module else []
            if node.level:
                base = here[: len(here) - node.level + 1] + base
            names = [".".join([*base, a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if (
                parts[:1] == ["polykey"]
                and parts[1:2]
                and parts[1] in SUBPACKAGES
                and parts[1] != own
                and parts[2:3]
                and parts[2][0] == "_"
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_the_import_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "polykey" / "nodes").mkdir(parents=True)
    source = tmp_path / "polykey" / "nodes" / "_x.py"
    source.write_text(
        "from polykey.rpc._codec import encode_json\n"
        "from ..quic import _socket\n"
        "from ._graph import NodeGraph\n"
        "from polykey.nodes._lookup import Lookup\n"
        "from polykey.quic import QUICSocket\n"
    )
    found = [line.split(": ", 1)[1] for line in _private_imports(source, tmp_path)]
    assert found == ["polykey.rpc._codec.encode_json", "polykey.quic._socket"]
    outside = tmp_path / "bench.py"
    outside.write_text("from polykey.nodes._graph import NodeGraph\n")
    found = [line.split(": ", 1)[1] for line in _private_imports(outside, tmp_path)]
    assert found == ["polykey.nodes._graph.NodeGraph"]


def test_callers_import_the_packages_not_their_modules() -> None:
    # Tests may reach into internals; the rest of the project, including the
    # other subpackages, may not.
    callers = [
        path
        for top in ("polykey", "bench", "examples")
        for path in (ROOT / top).rglob("*.py")
        if "node_modules" not in path.parts
    ]
    assert len(callers) > 20
    assert [hit for path in callers for hit in _private_imports(path)] == []


def test_one_address_type() -> None:
    assert polykey.nodes.Address is polykey.quic.Address
    definitions = [
        str(path.relative_to(ROOT))
        for top in ("polykey", "bench", "examples")
        for path in (ROOT / top).rglob("*.py")
        if "node_modules" not in path.parts
        for line in path.read_text().splitlines()
        # Address itself, or a second name for its type (testing's Endpoint
        # was one).
        if re.match(
            r"(Address(: TypeAlias)? = |\w+(: TypeAlias)? = tuple\[str, int\]$)", line
        )
    ]
    assert definitions == ["polykey/quic/_address.py"]
    address = polykey.nodes.NodeAddress("::FFFF:127.0.0.1", 1314).as_tuple()
    assert address == ("127.0.0.1", 1314)
