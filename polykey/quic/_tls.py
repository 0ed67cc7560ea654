"""Node identities on QUIC: Polykey's certificates and peer checks.

A node presents its certificate chain and proves its key in the TLS
handshake; quiche accepts any chain there (our shim's verify callback), and
right after the handshake the connection calls a verifier built here, which
checks the chain with :func:`polykey.keys.verify_chain`. A failure closes the
connection with CRYPTO_ERROR 0x100 + the TLS alert the keys layer names
(bad_certificate, certificate_expired, certificate_required), as js-quic
does.
"""

from __future__ import annotations

import collections
import datetime
from collections.abc import Iterable, Sequence

from cryptography import x509

from ..keys import CertificateError, NodeId, NodeIdentity, verify_chain
from ._config import PeerVerifier, TLSIdentity
from ._errors import PeerVerificationError, TLSAlert

__all__ = ["node_tls_identity", "node_verifier"]


def node_tls_identity(identity: NodeIdentity) -> TLSIdentity:
    """The TLS identity a node presents: its chain (leaf first) and key."""
    return TLSIdentity(
        cert_chain=identity.cert_chain_der(), private_key=identity.private_key_der()
    )


class _VerifiedChains:
    """Chains that passed verification, so a peer that reconnects with the
    same chain (the usual case) costs a dictionary lookup instead of four
    Ed25519 verifications and a DER walk per handshake.

    The key is the exact DER bytes plus the expected NodeIds; an entry is
    used only while every certificate in the chain is within its validity
    period, and failures are never cached. Bounded: the oldest entries go.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._entries: collections.OrderedDict[
            tuple[tuple[bytes, ...], frozenset[NodeId] | None],
            tuple[NodeId, datetime.datetime, datetime.datetime],
        ] = collections.OrderedDict()

    def verify(
        self,
        chain: Sequence[bytes],
        expected: frozenset[NodeId] | None,
        now: datetime.datetime | None = None,
    ) -> NodeId:
        key = (tuple(chain), expected)
        now = now or datetime.datetime.now(datetime.UTC)
        entry = self._entries.get(key)
        if entry is not None:
            node_id, valid_from, valid_until = entry
            if valid_from <= now < valid_until:
                self._entries.move_to_end(key)
                return node_id
            del self._entries[key]
        node_id = verify_chain(chain, expected=expected, now=now)
        certs = [x509.load_der_x509_certificate(der) for der in chain]
        valid_from = max(c.not_valid_before_utc for c in certs)
        valid_until = min(c.not_valid_after_utc for c in certs)
        self._entries[key] = (node_id, valid_from, valid_until)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return node_id


_verified = _VerifiedChains()


def node_verifier(expected: NodeId | Iterable[NodeId] | None = None) -> PeerVerifier:
    """A verifier accepting a peer with a valid Polykey node chain, walked to
    one of the ``expected`` NodeIds when given (a client dialling a node).
    The connection's ``peer_identity`` becomes the leaf's NodeId."""
    if expected is None:
        wanted: frozenset[NodeId] | None = None
    elif isinstance(expected, NodeId):
        wanted = frozenset((expected,))
    else:
        wanted = frozenset(expected)

    def verify(chain: Sequence[bytes]) -> NodeId:
        try:
            return _verified.verify(chain, wanted)
        except CertificateError as exc:
            try:
                alert = TLSAlert(exc.tls_alert)
            except ValueError:
                alert = TLSAlert.BAD_CERTIFICATE
            raise PeerVerificationError(str(exc), alert) from exc

    return verify
