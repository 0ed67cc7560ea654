"""The extension links quiche (and BoringSSL) statically and exports neither."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from polykey.quic import _quiche, quiche_version

EXTENSION = Path(_quiche.__file__)


def _run(*cmd: str) -> str:
    return subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=60
    ).stdout


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_quiche_is_linked_statically() -> None:
    defined = {
        line.split()[-1]
        for line in _run("nm", str(EXTENSION)).splitlines()
        if len(line.split()) == 3 and line.split()[1] in "tT"
    }
    for symbol in ("quiche_conn_send", "quiche_accept", "pk_config_new", "SSL_CTX_new"):
        assert symbol in defined, f"{symbol} is not defined in {EXTENSION.name}"
    # Only the module's init function is exported: BoringSSL stays private
    # and cannot clash with the OpenSSL that Python's ssl module loads.
    exported = _run("nm", "-D", "--defined-only", str(EXTENSION))
    assert "PyInit__quiche" in exported
    assert "SSL_CTX_new" not in exported
    assert "quiche_conn_send" not in exported


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not installed")
def test_no_shared_quiche_or_ssl_library_is_needed() -> None:
    libraries = _run("ldd", str(EXTENSION))
    assert "quiche" not in libraries
    assert "libssl" not in libraries
    assert "libcrypto" not in libraries


def test_version_is_the_pinned_one() -> None:
    assert quiche_version() == "0.29.3"
