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

from collections.abc import Iterable, Sequence

from ..keys import CertificateError, NodeId, NodeIdentity, verify_chain
from .config import PeerVerifier, TLSIdentity
from .errors import PeerVerificationError, TLSAlert

__all__ = ["node_tls_identity", "node_verifier"]


def node_tls_identity(identity: NodeIdentity) -> TLSIdentity:
    """The TLS identity a node presents: its chain (leaf first) and key."""
    return TLSIdentity(
        cert_chain=identity.cert_chain_der(), private_key=identity.private_key_der()
    )


def node_verifier(expected: NodeId | Iterable[NodeId] | None = None) -> PeerVerifier:
    """A verifier accepting a peer with a valid Polykey node chain, walked to
    one of the ``expected`` NodeIds when given (a client dialling a node).
    The connection's ``peer_identity`` becomes the leaf's NodeId."""
    wanted = (
        expected
        if expected is None or isinstance(expected, NodeId)
        else frozenset(expected)
    )

    def verify(chain: Sequence[bytes]) -> NodeId:
        try:
            return verify_chain(chain, expected=wanted)
        except CertificateError as exc:
            try:
                alert = TLSAlert(exc.tls_alert)
            except ValueError:
                alert = TLSAlert.BAD_CERTIFICATE
            raise PeerVerificationError(str(exc), alert) from exc

    return verify
