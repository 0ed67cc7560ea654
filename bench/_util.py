"""Shared helpers of the benchmark drivers and their peer processes.

Peers (``_quic_*.py``, ``_rpc_*.py``, ``js/*.mjs``, ``native/``) all speak
the same tiny protocol with the driver: a server prints ``READY <port>`` on
stdout once it listens; a client prints one JSON object per result line.
The QUIC echo protocol is the same everywhere: a server reads a stream to
its FIN, echoes it back if it held at most ``ECHO_LIMIT`` bytes, otherwise
answers with its length in decimal, then sends FIN.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable
ECHO_LIMIT = 1024
SERVER_CPU = 0
CLIENT_CPU = 1


# -- used by peer processes ---------------------------------------------------


def emit(obj: Any) -> None:
    """Print one result line for the driver."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def emit_stream(count: int, messages: int, elapsed: float) -> None:
    """Print a server-streaming client's result (``capped``: it stopped at
    its time cap before ``messages``)."""
    emit(
        {
            "count": count,
            "seconds": elapsed,
            "per_s": count / elapsed,
            "capped": count < messages,
        }
    )


def emit_latencies(seconds: list[float]) -> None:
    """Print a latency client's result: p50 and p95 in ms over its tries."""
    ms = sorted(t * 1000 for t in seconds)
    emit(
        {
            "count": len(ms),
            "p50_ms": statistics.median(ms),
            "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "max_ms": ms[-1],
        }
    )


def ready(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def echo_reply(total: int, head: bytes | bytearray) -> bytes:
    """What a benchmark server answers for a stream of ``total`` bytes whose
    first bytes were ``head``."""
    return bytes(head) if total <= ECHO_LIMIT else str(total).encode()


# -- certificates -----------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1/localhost (PEM
    files), for the peers that do not use polykey's node certificates.
    ECDSA because stock quiche and BoringSSL do not offer Ed25519."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- used by the drivers ------------------------------------------------------------


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` when taskset exists and the machine
    has that CPU."""
    if cpu is None or shutil.which("taskset") is None:
        return list(cmd)
    if cpu not in os.sched_getaffinity(0):
        return list(cmd)
    return ["taskset", "-c", str(cpu), *cmd]


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class PeerError(RuntimeError):
    pass


def _read_line(stream: IO[str], deadline: float, proc: subprocess.Popen[str]) -> str:
    """One line from a child's stdout, bounded by ``deadline`` (monotonic)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError("timed out waiting for the peer")
            if sel.select(left):
                line = stream.readline()
                if not line:
                    code = proc.poll()
                    raise PeerError(f"peer exited (code {code})")
                return line
    finally:
        sel.close()


@dataclass
class Peer:
    """A benchmark peer process; stderr goes to a log file."""

    name: str
    cmd: list[str]
    cwd: Path = ROOT
    env: dict[str, str] | None = None
    log_dir: Path = field(default_factory=lambda: Path("/tmp"))
    proc: subprocess.Popen[str] | None = None
    _log: IO[str] | None = None

    def start(self) -> Peer:
        log_path = self.log_dir / f"{self.name}.log"
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        return _read_line(self.proc.stdout, time.monotonic() + timeout, self.proc)

    def wait_ready(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if line.startswith("READY "):
                return int(line.split()[1])

    def read_json(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic())).strip()
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                if "error" in result:
                    raise PeerError(str(result["error"]))
                return result

    def send_line(self, text: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()

    def log_tail(self, lines: int = 5) -> str:
        path = self.log_dir / f"{self.name}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def run_client_against_server(
    server_cmd: list[str],
    client_cmd: Callable[[int], list[str]],
    *,
    log_dir: Path,
    pin: bool = True,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """One server process and one client of it (``client_cmd(port)``),
    pinned as the drivers pin them unless ``pin`` is false: the client's
    first JSON result. Both are stopped however it ends."""
    server = Peer(
        "server",
        pinned(server_cmd, SERVER_CPU if pin else None),
        cwd=cwd,
        env=env,
        log_dir=log_dir,
    ).start()
    try:
        port = server.wait_ready()
        client = Peer(
            "client",
            pinned(client_cmd(port), CLIENT_CPU if pin else None),
            cwd=cwd,
            env=env,
            log_dir=log_dir,
        ).start()
        try:
            return client.read_json(timeout)
        finally:
            client.stop()
    finally:
        server.stop()


class _RunSettings(Protocol):
    pin: bool
    log_dir: Path


class _RunImpl(Protocol):
    key: str
    cwd: Path


class PeerRunner:
    """What the drivers' runners share: the settings, the notes and samples
    printed under the table, and peer processes named in start order (their
    logs sort that way in ``log_dir``) and pinned to a CPU when asked."""

    #: Put in every peer's name after its serial number.
    prefix = ""

    def __init__(self, settings: _RunSettings) -> None:
        self.notes: list[str] = []
        self.samples: list[str] = []
        self._settings = settings
        self._serial = 0

    def _peer(self, impl: _RunImpl, role: str, cmd: list[str], cpu: int) -> Peer:
        self._serial += 1
        return Peer(
            name=f"{self._serial:02d}-{self.prefix}{impl.key}-{role}",
            cmd=pinned(cmd, cpu if self._settings.pin else None),
            cwd=impl.cwd,
            log_dir=self._settings.log_dir,
        )


def polykey_revision() -> str:
    """The commit polykey was measured at (read-only git), noting local
    changes under polykey/: others edit the tree while benchmarks run."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "polykey"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in polykey/" if dirty else "")


def format_table(
    title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]
) -> str:
    widths = [max(len(r[0]) for r in rows) if rows else 0]
    widths[0] = max(widths[0], len(title))
    for i, col in enumerate(columns):
        widths.append(max(len(col), *(len(r[1][i]) for r in rows)))
    lines = [
        " | ".join(
            [title.ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(columns, widths[1:], strict=True)]
        )
    ]
    lines.append("-+-".join("-" * w for w in widths))
    for label, cells in rows:
        lines.append(
            " | ".join(
                [label.ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(cells, widths[1:], strict=True)]
            )
        )
    return "\n".join(lines)


def ensure_js(log: IO[str] = sys.stderr) -> Path:
    """bench/js with its node_modules (``npm ci`` on first use)."""
    js = BENCH_DIR / "js"
    if not (js / "node_modules" / "@matrixai" / "quic").exists():
        print("bench: npm ci in bench/js ...", file=log, flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=js, check=True)
    return js
