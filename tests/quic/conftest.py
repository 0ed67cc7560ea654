"""Fixtures of the QUIC tests (the helpers themselves are in helpers.py)."""

from __future__ import annotations

import pytest

from .helpers import plain_identity


@pytest.fixture(scope="session")
def server_identity() -> tuple[bytes, bytes]:
    return plain_identity("server")


@pytest.fixture(scope="session")
def client_identity() -> tuple[bytes, bytes]:
    return plain_identity("client")
