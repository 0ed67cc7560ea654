"""Fixtures of the QUIC interop tests (the helpers are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polykey.keys import NodeIdentity

from .helpers import NodeCredentials, write_credentials


@pytest.fixture
def our_node(tmp_path: Path) -> NodeCredentials:
    """The polykey side's node."""
    return write_credentials(NodeIdentity.generate(), tmp_path, "ours")


@pytest.fixture
def their_node(tmp_path: Path) -> NodeCredentials:
    """The reference peer's node (a Polykey node certificate too, so our
    ``node_verifier`` can check it)."""
    return write_credentials(NodeIdentity.generate(), tmp_path, "theirs")
