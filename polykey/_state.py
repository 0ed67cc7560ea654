"""A node's state directory: its identity, kept across restarts.

Layout (created 0700, files 0600)::

    <state_dir>/lock                         held (flock) while a node runs
    <state_dir>/keys/private_key.pem         the Ed25519 key: the NodeId
    <state_dir>/keys/certificate_chain.pem   node certificates, leaf first
    <state_dir>/nodes.sqlite3                the node graph
    <state_dir>/control.sock                 the control socket (while running)

One node at a time uses a state directory: :func:`lock_state_dir` takes an
exclusive ``flock`` on ``lock`` before anything else is read or created, so
a second node (or the loser of two simultaneous first starts) fails at once
with :class:`StateDirInUseError` and touches nothing.  The kernel drops the
lock when the process dies, SIGKILL included: there is no stale lock.

The key is written once; the certificate is renewed with the same key (so
the NodeId stays) when it is missing, unreadable, invalid, or expires within
a day. Files are written atomically, so a crash leaves the old one or the new
one, never half of either.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
from pathlib import Path

import attrs

from .errors import PolykeyError
from .keys import (
    CertChain,
    CertificateError,
    KeysError,
    NodeIdentity,
    load_cert_chain,
    load_key_pair,
    load_or_generate_key_pair,
    save_cert_chain,
    save_key_pair,
    verify_chain,
)

__all__ = [
    "MAX_UNIX_PATH",
    "StateDirError",
    "StateDirInUseError",
    "StateDirLock",
    "default_state_dir",
    "load_or_create_identity",
    "lock_state_dir",
    "renew_identity",
    "state_dir_in_use",
]

log = logging.getLogger("polykey.node")

_RENEW_BEFORE = datetime.timedelta(days=1)

#: The longest path a Unix socket can be bound at (``sun_path`` holds 108
#: bytes with the terminating NUL).
MAX_UNIX_PATH = 107


class StateDirError(PolykeyError):
    """The state directory cannot be used."""


class StateDirInUseError(StateDirError):
    """Another node is running with this state directory."""


@attrs.define
class StateDirLock:
    """The held lock on a state directory; :meth:`release` is idempotent."""

    path: Path
    fd: int | None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


def state_dir_in_use(state_dir: Path) -> bool:
    """Whether a node holds ``state_dir``'s lock now."""
    try:
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the lock if we took it
    return False


def lock_state_dir(
    state_dir: Path, *, socket_name: str = "control.sock"
) -> StateDirLock:
    """Create ``state_dir`` if needed and lock it for this process.

    Raises :class:`StateDirInUseError` when another node holds it and
    :class:`StateDirError` when it cannot be used (not a directory, not
    writable, or a path too long for the control socket).
    """
    socket_path = state_dir.absolute() / socket_name
    if len(os.fsencode(socket_path)) > MAX_UNIX_PATH:
        raise StateDirError(
            f"state directory {state_dir} is too long a path for the control"
            f" socket ({len(os.fsencode(socket_path))} bytes with"
            f" {socket_name!r}, at most {MAX_UNIX_PATH}): use a shorter one"
        )
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirError(f"state directory {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirInUseError(
                f"state directory {state_dir} is in use by another node{by}"
            ) from None
        raise StateDirError(f"state directory {state_dir}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(state_dir / "lock", fd)


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


def renew_identity(
    state_dir: Path, *, now: datetime.datetime | None = None
) -> tuple[NodeIdentity, NodeIdentity]:
    """Move the node in ``state_dir`` to a new key pair, as Polykey renews:
    the new certificate is issued by the old key and goes in front of the
    chain, so a peer that dials the old NodeId can follow the chain to it.
    The node graph is carried over to the new NodeId when the node next
    opens it. Needs the node stopped
    (the state directory is locked meanwhile: StateDirInUseError otherwise).

    Returns (old, new). The chain is written before the key: a crash in
    between leaves the old key with a chain for another, which the next start
    repairs by renewing the old key's own certificate (the NodeId stays the
    old one, consistently).
    """
    lock = lock_state_dir(state_dir)
    try:
        keys_dir = state_dir / "keys"
        old = NodeIdentity(
            load_key_pair(keys_dir / "private_key.pem"),
            load_cert_chain(keys_dir / "certificate_chain.pem"),
        )
        new = old.renew(now=now)
        # The graph follows on the next start: its owner is a NodeId of our
        # chain (see NodeGraph.open's ``previous_ids``).
        save_cert_chain(new.chain, keys_dir / "certificate_chain.pem")
        save_key_pair(new.key_pair, keys_dir / "private_key.pem")
        log.info("renewed the node's key: %s -> %s", old.node_id, new.node_id)
        return old, new
    finally:
        lock.release()
