"""The QUIC objects talk through their internal interfaces (docs/quic.md,
"Internal interfaces"), never through each other's underscored attributes."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest

import polykey.quic

QUIC_DIR = Path(polykey.quic.__file__).parent
# Every module of the package but _binding.py, the cffi layer, whose
# classes share their C pointers within the module.
MODULES = sorted(
    path.name for path in QUIC_DIR.glob("*.py") if path.name != "_binding.py"
)


def foreign_private_accesses(source: str) -> list[str]:
    """Every ``<expr>._name`` in ``source`` where ``<expr>`` is not a bare
    ``self`` or ``cls`` (relative imports such as ``from ._x`` aside)."""
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT}
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in skip
    ]
    found = []
    for i in range(1, len(tokens) - 1):
        dot, name, before = tokens[i], tokens[i + 1], tokens[i - 1]
        if dot.string != "." or name.type != tokenize.NAME:
            continue
        if not name.string.startswith("_") or name.string.startswith("__"):
            continue
        if before.string in ("from", "."):
            continue  # a relative import
        own = before.string in ("self", "cls") and tokens[i - 2].string != "."
        if not own:
            found.append(f"{dot.start[0]}: {before.string}.{name.string}")
    return found


def test_the_check_finds_what_it_looks_for() -> None:
    source = (
        "self._a = 1\nconn._q.recv()\nself._conn._flush()\nfrom ._binding import x\n"
    )
    assert foreign_private_accesses(source) == ["2: conn._q", "3: _conn._flush"]


@pytest.mark.parametrize("module", MODULES)
def test_no_object_reaches_into_another(module: str) -> None:
    source = (QUIC_DIR / module).read_text()
    assert foreign_private_accesses(source) == []


def test_every_driver_module_is_checked() -> None:
    # A glob that found nothing would leave the test above with no cases.
    assert {"_socket.py", "_connection.py", "_stream.py", "_tls.py"} <= set(MODULES)
