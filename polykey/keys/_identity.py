"""Ed25519 key pairs and their files.

A node's private key lives in its state directory as a PKCS#8 PEM file with
mode 0600 (optionally encrypted with a password). Files are written
atomically: a temporary file in the same directory, fsync, rename over the
target, fsync the directory. A crash leaves either the old key or the new
one, never a torn file; the directory is created 0700 when missing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ._errors import KeyFileError
from ._node_id import NodeId

__all__ = [
    "KeyPair",
    "load_key_pair",
    "load_or_generate_key_pair",
    "save_key_pair",
    "write_file_atomic",
]

_FILE_MODE = 0o600
_DIR_MODE = 0o700


def _is_ed25519_private_key(
    instance: object, attribute: object, value: Ed25519PrivateKey
) -> None:
    if not isinstance(value, Ed25519PrivateKey):
        raise TypeError(
            f"KeyPair needs an Ed25519PrivateKey, not {type(value).__name__}"
        )


def _node_id_of(key_pair: KeyPair) -> NodeId:
    return NodeId.from_public_key(key_pair.private_key.public_key())


@attrs.frozen(repr=False, eq=False)
class KeyPair:
    """An Ed25519 key pair and the NodeId it gives."""

    private_key: Ed25519PrivateKey = attrs.field(validator=_is_ed25519_private_key)
    node_id: NodeId = attrs.field(
        init=False, default=attrs.Factory(_node_id_of, takes_self=True)
    )

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """Deterministic key pair from a 32-byte seed (tests, fixtures)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> KeyPair:
        """Load a PKCS#8 PEM private key; raises KeyFileError."""
        return cls(_parse_private_key(data, password, pem=True))

    @classmethod
    def from_der(cls, data: bytes, password: bytes | None = None) -> KeyPair:
        """Load a PKCS#8 DER private key; raises KeyFileError."""
        return cls(_parse_private_key(data, password, pem=False))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted when ``password`` is given."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            _encryption(password),
        )

    def private_key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER (what TLS stacks load from memory)."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyPair):
            return self.node_id == other.node_id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.node_id)

    def __repr__(self) -> str:
        # Never show the private key.
        return f"KeyPair(node_id={self.node_id})"


def _encryption(password: bytes | None) -> serialization.KeySerializationEncryption:
    if password is None:
        return serialization.NoEncryption()
    if not password:
        raise ValueError("password must not be empty")
    return serialization.BestAvailableEncryption(password)


def _parse_private_key(
    data: bytes, password: bytes | None, *, pem: bool, source: str = "private key"
) -> Ed25519PrivateKey:
    load = (
        serialization.load_pem_private_key
        if pem
        else serialization.load_der_private_key
    )
    try:
        key = load(data, password)
    except TypeError as exc:
        # cryptography raises TypeError for a password mismatch in kind.
        if password is None:
            raise KeyFileError(
                f"{source} is encrypted and no password was given"
            ) from None
        raise KeyFileError(
            f"{source} is not encrypted but a password was given"
        ) from exc
    except ValueError:
        what = "corrupt or the password is wrong" if password else "corrupt"
        raise KeyFileError(f"{source} is {what}") from None
    except UnsupportedAlgorithm:
        raise KeyFileError(f"{source} uses an unsupported key algorithm") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{source} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def write_file_atomic(
    path: str | os.PathLike[str], data: bytes, mode: int = _FILE_MODE
) -> None:
    """Replace ``path`` with ``data`` atomically, creating the parent 0700."""
    target = Path(path)
    directory = target.parent
    if not directory.exists():
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; make sure it is exactly 0700.
        directory.chmod(_DIR_MODE)
    tmp = directory / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    # O_EXCL: never follow or reuse something already at the temporary name.
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode
    )
    try:
        try:
            os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Persist the rename itself.
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_key_pair(
    key_pair: KeyPair, path: str | os.PathLike[str], *, password: bytes | None = None
) -> None:
    """Write the private key as PKCS#8 PEM, mode 0600, atomically."""
    write_file_atomic(path, key_pair.private_key_pem(password))


def load_key_pair(
    path: str | os.PathLike[str], *, password: bytes | None = None
) -> KeyPair:
    """Read a key file written by :func:`save_key_pair`; raises KeyFileError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {os.fspath(path)!r} does not exist") from None
    except OSError as exc:
        raise KeyFileError(
            f"key file {os.fspath(path)!r} cannot be read: {exc.strerror}"
        ) from None
    source = f"key file {os.fspath(path)!r}"
    return KeyPair(_parse_private_key(data, password, pem=True, source=source))


def load_or_generate_key_pair(
    path: str | os.PathLike[str], *, password: bytes | None = None
) -> tuple[KeyPair, bool]:
    """Load the key at ``path``, or generate and save one if there is none.

    Returns the key pair and whether it was newly generated. Any other
    problem with an existing file raises KeyFileError: a corrupt key is
    never silently replaced, since that would change the node's identity.
    """
    if not Path(path).exists():
        key_pair = KeyPair.generate()
        save_key_pair(key_pair, path, password=password)
        return key_pair, True
    return load_key_pair(path, password=password), False
