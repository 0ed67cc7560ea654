"""polykey.keys: node identity (Ed25519 keys, NodeIds, node certificates).

A node is an Ed25519 key pair; its :class:`NodeId` is the raw public key,
written the way Polykey writes it. Its certificates follow Polykey's format
so that our nodes and Polykey's verify each other (see ``_x509`` for how).
"""

from __future__ import annotations

from ._errors import (
    CertificateChainEmptyError,
    CertificateChainError,
    CertificateError,
    CertificateExpiredError,
    CertificateIdentityError,
    CertificateKeyTypeError,
    CertificateNotYetValidError,
    CertificateParseError,
    CertificateSignatureError,
    CertificateValidityError,
    KeyFileError,
    KeysError,
    NodeIdError,
    NodeIdMismatchError,
    NodeSignatureError,
)
from ._identity import (
    KeyPair,
    load_key_pair,
    load_or_generate_key_pair,
    save_key_pair,
)
from ._node_id import (
    NODE_ID_LENGTH,
    NODE_ID_STRING_LENGTH,
    NodeId,
    bucket_index,
    node_distance,
)
from ._verify import (
    MAX_CHAIN_LENGTH,
    NODE_SIGNATURE_OID,
    POLYKEY_VERSION_OID,
    load_certificate,
    verify_certificate,
    verify_chain,
)
from ._x509 import (
    CERT_VERSION,
    DEFAULT_CERT_DURATION,
    CertChain,
    NodeIdentity,
    generate_certificate,
    load_cert_chain,
    save_cert_chain,
)

__all__ = [
    "CERT_VERSION",
    "DEFAULT_CERT_DURATION",
    "MAX_CHAIN_LENGTH",
    "NODE_ID_LENGTH",
    "NODE_ID_STRING_LENGTH",
    "NODE_SIGNATURE_OID",
    "POLYKEY_VERSION_OID",
    "CertChain",
    "CertificateChainEmptyError",
    "CertificateChainError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateIdentityError",
    "CertificateKeyTypeError",
    "CertificateNotYetValidError",
    "CertificateParseError",
    "CertificateSignatureError",
    "CertificateValidityError",
    "KeyFileError",
    "KeyPair",
    "KeysError",
    "NodeId",
    "NodeIdError",
    "NodeIdMismatchError",
    "NodeIdentity",
    "NodeSignatureError",
    "bucket_index",
    "generate_certificate",
    "load_cert_chain",
    "load_certificate",
    "load_key_pair",
    "load_or_generate_key_pair",
    "node_distance",
    "save_cert_chain",
    "save_key_pair",
    "verify_certificate",
    "verify_chain",
]
