"""A node's state directory: its identity, kept across restarts.

Layout (created 0700, files 0600)::

    <state_dir>/keys/private_key.pem         the Ed25519 key: the NodeId
    <state_dir>/keys/certificate_chain.pem   node certificates, leaf first

The key is written once; the certificate is renewed with the same key (so
the NodeId stays) when it is missing, unreadable, invalid, or expires within
a day. Files are written atomically, so a crash leaves the old one or the new
one, never half of either.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from .keys import (
    CertChain,
    CertificateError,
    KeysError,
    NodeIdentity,
    load_cert_chain,
    load_or_generate_key_pair,
    save_cert_chain,
    verify_chain,
)

__all__ = ["default_state_dir", "load_or_create_identity"]

log = logging.getLogger("polykey.node")

_RENEW_BEFORE = datetime.timedelta(days=1)


def default_state_dir() -> Path:
    """``$XDG_DATA_HOME/polykey`` (``~/.local/share/polykey`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "polykey"


def load_or_create_identity(
    state_dir: Path, *, now: datetime.datetime | None = None
) -> tuple[NodeIdentity, bool]:
    """The node's identity from ``state_dir``, created on first use.

    Returns ``(identity, created)``. Raises :class:`polykey.keys.KeyFileError`
    when the key file exists but cannot be used: a node must never quietly
    take a new NodeId.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    keys_dir = state_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    os.chmod(keys_dir, 0o700)
    key_pair, created = load_or_generate_key_pair(keys_dir / "private_key.pem")
    chain_path = keys_dir / "certificate_chain.pem"
    chain: CertChain | None = None
    if not created and chain_path.exists():
        try:
            chain = load_cert_chain(chain_path)
            verify_chain(chain.to_der_list(), now=now + _RENEW_BEFORE)
            if chain.node_id != key_pair.node_id:
                raise CertificateError("the certificate is for another key")
        except KeysError as exc:
            log.warning("renewing the node certificate: %s", exc)
            chain = None
    if chain is not None:
        return NodeIdentity(key_pair, chain), created
    identity = NodeIdentity.generate(key_pair, now=now)
    save_cert_chain(identity.chain, chain_path)
    return identity, created
