"""Build polykey's QUIC core: the Rust wrapper crate, then the cffi extension.

Run by setuptools through ``cffi_modules``: ``pip install .`` for a wheel, or
the editable install that ``make`` (scripts/setup.sh) does.

Two steps:

1. ``cargo build --release --locked`` of ``_quiche_build/``, a staticlib that
   pins quiche 0.29.3 (with BoringSSL inside) and adds the ``pk_*`` shim.
   quiche's crate is first copied into ``_quiche_build/vendor/quiche`` and
   patched with our fixes (``_quiche_build/patch_quiche.py`` says which and
   why); the pristine source's checksum is pinned by
   ``_quiche_build/fetch/Cargo.lock``.
   Cargo's target directory lives outside the checkout, in
   ``$POLYKEY_CACHE_DIR`` (default ``~/.cache/polykey``), in a folder named
   after the hash of ``Cargo.lock``: the first build compiles BoringSSL and
   takes minutes, every later build with the same lock file takes seconds.
2. A cffi API-mode extension ``polykey.quic._quiche`` that includes quiche's
   own header (so the C compiler checks our declarations against it) and
   links the static library, plus a C function of our own for the socket's
   reads (``pk_recv_dgrams``, one ``recvmmsg(2)``). ``--exclude-libs,ALL`` keeps BoringSSL's
   symbols out of the dynamic symbol table, so they never clash with the
   OpenSSL that Python's ``ssl`` module or ``cryptography`` loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CRATE = HERE / "_quiche_build"
LIB_NAME = "libpolykey_quiche.a"

# The part of quiche.h (plus our shim) that polykey uses. API mode: the
# compiler checks every line here against the real header.
CDEF = """
#define QUICHE_PROTOCOL_VERSION ...
#define QUICHE_MAX_CONN_ID_LEN ...
#define QUICHE_MIN_CLIENT_INITIAL_LEN ...

typedef int... socklen_t;
typedef unsigned short sa_family_t;
struct sockaddr { sa_family_t sa_family; ...; };
struct sockaddr_storage { sa_family_t ss_family; ...; };
struct in_addr { uint32_t s_addr; };
struct sockaddr_in {
    sa_family_t sin_family; uint16_t sin_port; struct in_addr sin_addr; ...;
};
struct in6_addr { uint8_t s6_addr[16]; ...; };
struct sockaddr_in6 {
    sa_family_t sin6_family; uint16_t sin6_port; uint32_t sin6_flowinfo;
    struct in6_addr sin6_addr; uint32_t sin6_scope_id; ...;
};
struct timespec { long tv_sec; long tv_nsec; ...; };
#define AF_INET ...
#define AF_INET6 ...

const char *quiche_version(void);

typedef struct quiche_config quiche_config;
quiche_config *quiche_config_new(uint32_t version);
void quiche_config_grease(quiche_config *config, bool v);
void quiche_config_enable_early_data(quiche_config *config);
int quiche_config_set_application_protos(quiche_config *config,
                                         const uint8_t *protos, size_t protos_len);
void quiche_config_set_max_idle_timeout(quiche_config *config, uint64_t v);
void quiche_config_set_max_recv_udp_payload_size(quiche_config *config, size_t v);
void quiche_config_set_max_send_udp_payload_size(quiche_config *config, size_t v);
void quiche_config_set_initial_max_data(quiche_config *config, uint64_t v);
void quiche_config_set_initial_max_stream_data_bidi_local(quiche_config *config, uint64_t v);
void quiche_config_set_initial_max_stream_data_bidi_remote(quiche_config *config, uint64_t v);
void quiche_config_set_initial_max_stream_data_uni(quiche_config *config, uint64_t v);
void quiche_config_set_initial_max_streams_bidi(quiche_config *config, uint64_t v);
void quiche_config_set_initial_max_streams_uni(quiche_config *config, uint64_t v);
void quiche_config_set_disable_active_migration(quiche_config *config, bool v);
int quiche_config_set_cc_algorithm_name(quiche_config *config, const char *algo);
void quiche_config_enable_hystart(quiche_config *config, bool v);
void quiche_config_enable_pacing(quiche_config *config, bool v);
void quiche_config_enable_dgram(quiche_config *config, bool enabled,
                                size_t recv_queue_len, size_t send_queue_len);
void quiche_config_set_max_connection_window(quiche_config *config, uint64_t v);
void quiche_config_set_max_stream_window(quiche_config *config, uint64_t v);
void quiche_config_set_active_connection_id_limit(quiche_config *config, uint64_t v);
void quiche_config_discover_pmtu(quiche_config *config, bool v);
void quiche_config_free(quiche_config *config);

int quiche_header_info(const uint8_t *buf, size_t buf_len, size_t dcil,
                       uint32_t *version, uint8_t *type,
                       uint8_t *scid, size_t *scid_len,
                       uint8_t *dcid, size_t *dcid_len,
                       uint8_t *token, size_t *token_len);

typedef struct quiche_conn quiche_conn;
quiche_conn *quiche_accept(const uint8_t *scid, size_t scid_len,
                           const uint8_t *odcid, size_t odcid_len,
                           const struct sockaddr *local, socklen_t local_len,
                           const struct sockaddr *peer, socklen_t peer_len,
                           quiche_config *config);
quiche_conn *quiche_connect(const char *server_name,
                            const uint8_t *scid, size_t scid_len,
                            const struct sockaddr *local, socklen_t local_len,
                            const struct sockaddr *peer, socklen_t peer_len,
                            quiche_config *config);
ssize_t quiche_negotiate_version(const uint8_t *scid, size_t scid_len,
                                 const uint8_t *dcid, size_t dcid_len,
                                 uint8_t *out, size_t out_len);
ssize_t quiche_retry(const uint8_t *scid, size_t scid_len,
                     const uint8_t *dcid, size_t dcid_len,
                     const uint8_t *new_scid, size_t new_scid_len,
                     const uint8_t *token, size_t token_len,
                     uint32_t version, uint8_t *out, size_t out_len);
bool quiche_version_is_supported(uint32_t version);

typedef struct {
    struct sockaddr *from;
    socklen_t from_len;
    struct sockaddr *to;
    socklen_t to_len;
} quiche_recv_info;
ssize_t quiche_conn_recv(quiche_conn *conn, uint8_t *buf, size_t buf_len,
                         const quiche_recv_info *info);

typedef struct {
    struct sockaddr_storage from;
    socklen_t from_len;
    struct sockaddr_storage to;
    socklen_t to_len;
    struct timespec at;
} quiche_send_info;
ssize_t quiche_conn_send(quiche_conn *conn, uint8_t *out, size_t out_len,
                         quiche_send_info *out_info);
size_t quiche_conn_send_quantum(const quiche_conn *conn);

ssize_t quiche_conn_stream_recv(quiche_conn *conn, uint64_t stream_id,
                                uint8_t *out, size_t buf_len, bool *fin,
                                uint64_t *out_error_code);
ssize_t quiche_conn_stream_send(quiche_conn *conn, uint64_t stream_id,
                                const uint8_t *buf, size_t buf_len, bool fin,
                                uint64_t *out_error_code);
enum quiche_shutdown { QUICHE_SHUTDOWN_READ = 0, QUICHE_SHUTDOWN_WRITE = 1 };
int quiche_conn_stream_shutdown(quiche_conn *conn, uint64_t stream_id,
                                enum quiche_shutdown direction, uint64_t err);
ssize_t quiche_conn_stream_capacity(quiche_conn *conn, uint64_t stream_id);
bool quiche_conn_stream_readable(const quiche_conn *conn, uint64_t stream_id);
int64_t quiche_conn_stream_readable_next(quiche_conn *conn);
int quiche_conn_stream_writable(quiche_conn *conn, uint64_t stream_id, size_t len);
int64_t quiche_conn_stream_writable_next(quiche_conn *conn);
bool quiche_conn_stream_finished(const quiche_conn *conn, uint64_t stream_id);

size_t quiche_conn_max_send_udp_payload_size(const quiche_conn *conn);
uint64_t quiche_conn_timeout_as_nanos(const quiche_conn *conn);
void quiche_conn_on_timeout(quiche_conn *conn);
int quiche_conn_close(quiche_conn *conn, bool app, uint64_t err,
                      const uint8_t *reason, size_t reason_len);
void quiche_conn_trace_id(const quiche_conn *conn, const uint8_t **out, size_t *out_len);
void quiche_conn_source_id(const quiche_conn *conn, const uint8_t **out, size_t *out_len);
void quiche_conn_destination_id(const quiche_conn *conn, const uint8_t **out, size_t *out_len);
void quiche_conn_application_proto(const quiche_conn *conn, const uint8_t **out,
                                   size_t *out_len);
void quiche_conn_server_name(const quiche_conn *conn, const uint8_t **out, size_t *out_len);
bool quiche_conn_is_established(const quiche_conn *conn);
bool quiche_conn_is_in_early_data(const quiche_conn *conn);
bool quiche_conn_is_readable(const quiche_conn *conn);
bool quiche_conn_is_draining(const quiche_conn *conn);
bool quiche_conn_is_closed(const quiche_conn *conn);
bool quiche_conn_is_timed_out(const quiche_conn *conn);
bool quiche_conn_is_server(const quiche_conn *conn);
uint64_t quiche_conn_peer_streams_left_bidi(const quiche_conn *conn);
uint64_t quiche_conn_peer_streams_left_uni(const quiche_conn *conn);
bool quiche_conn_peer_error(const quiche_conn *conn, bool *is_app,
                            uint64_t *error_code, const uint8_t **reason,
                            size_t *reason_len);
bool quiche_conn_local_error(const quiche_conn *conn, bool *is_app,
                             uint64_t *error_code, const uint8_t **reason,
                             size_t *reason_len);
ssize_t quiche_conn_send_ack_eliciting(quiche_conn *conn);

typedef struct quiche_stream_iter quiche_stream_iter;
quiche_stream_iter *quiche_conn_readable(const quiche_conn *conn);
quiche_stream_iter *quiche_conn_writable(const quiche_conn *conn);
bool quiche_stream_iter_next(quiche_stream_iter *iter, uint64_t *stream_id);
void quiche_stream_iter_free(quiche_stream_iter *iter);

ssize_t quiche_conn_dgram_max_writable_len(const quiche_conn *conn);
ssize_t quiche_conn_dgram_recv(quiche_conn *conn, uint8_t *buf, size_t buf_len);
ssize_t quiche_conn_dgram_send(quiche_conn *conn, const uint8_t *buf, size_t buf_len);

typedef struct {
    size_t recv;
    size_t sent;
    size_t lost;
    size_t spurious_lost;
    size_t retrans;
    uint64_t sent_bytes;
    uint64_t recv_bytes;
    uint64_t acked_bytes;
    uint64_t lost_bytes;
    uint64_t stream_retrans_bytes;
    size_t dgram_recv;
    size_t dgram_sent;
    size_t paths_count;
    uint64_t reset_stream_count_local;
    uint64_t stopped_stream_count_local;
    uint64_t reset_stream_count_remote;
    uint64_t stopped_stream_count_remote;
    ...;
} quiche_stats;
void quiche_conn_stats(const quiche_conn *conn, quiche_stats *out);

typedef struct {
    struct sockaddr_storage local_addr;
    socklen_t local_addr_len;
    struct sockaddr_storage peer_addr;
    socklen_t peer_addr_len;
    ssize_t validation_state;
    bool active;
    size_t recv;
    size_t sent;
    size_t lost;
    size_t retrans;
    size_t total_pto_count;
    uint64_t rtt;
    uint64_t min_rtt;
    uint64_t rttvar;
    size_t cwnd;
    uint64_t sent_bytes;
    uint64_t recv_bytes;
    uint64_t lost_bytes;
    size_t pmtu;
    uint64_t delivery_rate;
    ...;
} quiche_path_stats;
int quiche_conn_path_stats(const quiche_conn *conn, size_t idx, quiche_path_stats *out);

void quiche_conn_free(quiche_conn *conn);

"""

# polykey's shim (_quiche_build/src/lib.rs), declared to cffi and to C.
SHIM_DECLS = """
quiche_config *pk_config_new(uint32_t version, const uint8_t *chain, size_t chain_len,
                             const uint8_t *key, size_t key_len, int peer_cert,
                             char *err, size_t err_len);
size_t pk_conn_peer_cert_chain_len(const quiche_conn *conn);
bool pk_conn_peer_cert_chain_get(const quiche_conn *conn, size_t index,
                                 const uint8_t **out, size_t *out_len);
void pk_conn_peer_cert_chain_drop(const quiche_conn *conn);
void pk_conn_shed_handshake_config(const quiche_conn *conn);
void quiche_conn_peer_cert(const quiche_conn *conn, const uint8_t **out,
                           size_t *out_len);
void quiche_conn_session(const quiche_conn *conn, const uint8_t **out,
                         size_t *out_len);
ssize_t pk_conn_send_batch(quiche_conn *conn, uint8_t *out, size_t out_len,
                           size_t max_segments, size_t *segment_size,
                           quiche_send_info *info);
size_t pk_conn_recv_segments(quiche_conn *conn, uint8_t *buf, size_t len,
                             size_t segment, const uint8_t *dcid, size_t dcid_len,
                             const quiche_recv_info *info);
typedef struct {
    uint32_t kind;
    uint8_t prefix[16];
    quiche_conn *out;
    uint8_t out_prefix[16];
    uint64_t budget;
    uint8_t dcid[20];
    size_t dcid_len;
    const quiche_recv_info *info;
    uint64_t datagrams;
    uint64_t bytes;
    uint64_t dropped;
} pk_dgram_route;
ssize_t pk_conn_dgram_route(quiche_conn *conn, pk_dgram_route *routes, size_t n_routes,
                            size_t prefix_len, uint8_t *buf, size_t buf_len);
size_t pk_conn_dgram_send_segments(quiche_conn *conn, const uint8_t *prefix,
                                   size_t prefix_len, const uint8_t *data, size_t len,
                                   size_t segment, uint8_t *scratch, size_t scratch_len);
"""

# The socket's receive side, in C: one recvmmsg(2) reads what is queued (GRO
# batches included) and, by reading fewer than it could, says the queue is
# empty, so a reader woken for one datagram makes one syscall, not a second
# that fails with EAGAIN (see "A call in flight alone" in docs/quic.md).
RECV_DECLS = """
typedef struct {
    size_t len;
    int segment;
    socklen_t addr_len;
    struct sockaddr_storage addr;
    ...;
} pk_dgram;
int pk_recv_dgrams(int fd, uint8_t *buf, size_t slot, pk_dgram *out, unsigned int n);
"""
# The same struct for the C compiler (cffi's "...;" lets the compiler lay it
# out; C has no such line).
_RECV_TYPE_C = RECV_DECLS.split("int pk_recv_dgrams")[0].replace("    ...;\n", "")

RECV_SOURCE = """
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define PK_RECV_MAX 8
#if defined(__linux__)
typedef struct mmsghdr pk_mmsg;
#else
typedef struct { struct msghdr msg_hdr; unsigned int msg_len; } pk_mmsg;
#endif

/* Reads up to n (at most PK_RECV_MAX) datagrams without blocking, the i-th
   into buf + i * slot; fills out[i] (length, GRO segment size or 0, source
   address). Returns how many, 0 if none was queued, or -errno. */
int pk_recv_dgrams(int fd, uint8_t *buf, size_t slot, pk_dgram *out, unsigned int n) {
    pk_mmsg msgs[PK_RECV_MAX];
    struct iovec iov[PK_RECV_MAX];
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control[PK_RECV_MAX];
    if (n > PK_RECV_MAX) n = PK_RECV_MAX;
    memset(msgs, 0, sizeof(msgs[0]) * n);
    for (unsigned int i = 0; i < n; i++) {
        iov[i].iov_base = buf + i * slot;
        iov[i].iov_len = slot;
        msgs[i].msg_hdr.msg_name = &out[i].addr;
        msgs[i].msg_hdr.msg_namelen = sizeof(out[i].addr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = control[i].buf;
        msgs[i].msg_hdr.msg_controllen = sizeof(control[i].buf);
    }
#if defined(__linux__)
    int got;
    do  /* a signal: try again, as Python's socket calls do (PEP 475) */
        got = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
#else
    /* No recvmmsg(2): one recvmsg(2) each, to the same end. */
    int got = 0;
    while ((unsigned int)got < n) {
        ssize_t r = recvmsg(fd, &msgs[got].msg_hdr, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (got == 0)
                return -errno;
            break;
        }
        msgs[got].msg_len = (unsigned int)r;
        got++;
    }
#endif
    for (int i = 0; i < got; i++) {
        struct msghdr *hdr = &msgs[i].msg_hdr;
        out[i].len = msgs[i].msg_len;
        out[i].addr_len = hdr->msg_namelen;
        out[i].segment = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(hdr); c != NULL; c = CMSG_NXTHDR(hdr, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO
                && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int segment;
                memcpy(&segment, CMSG_DATA(c), sizeof(segment));
                out[i].segment = segment;
            }
        }
    }
    return got;
}
"""


def _fail(message: str) -> None:
    sys.stderr.write(f"setup_quiche: {message}\n")
    raise SystemExit(1)


def cache_dir() -> Path:
    """Cargo's target directory for the current lock file."""
    lock = (CRATE / "Cargo.lock").read_bytes()
    key = hashlib.sha256(lock).hexdigest()[:16]
    root = Path(
        os.environ.get("POLYKEY_CACHE_DIR") or Path.home() / ".cache" / "polykey"
    )
    return root / f"quiche-{key}"


def _cargo() -> str:
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        _fail("cargo not found: install Rust 1.88 or newer (https://rustup.rs)")
    return cargo


def _crate_dir(manifest: Path, name: str) -> Path:
    out = subprocess.run(
        [
            _cargo(), "metadata", "--format-version", "1", "--locked",
            "--manifest-path", str(manifest),
        ],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for pkg in json.loads(out)["packages"]:
        if pkg["name"] == name:
            return Path(pkg["manifest_path"]).parent
    _fail(f"cargo metadata of {manifest} does not list {name}")
    raise AssertionError  # unreachable


def vendor_quiche() -> Path:
    """Copy quiche's pristine crate (checksum pinned by fetch/Cargo.lock)
    into _quiche_build/vendor/quiche and apply patch_quiche's fixes."""
    sys.path.insert(0, str(CRATE))
    try:
        import patch_quiche
    finally:
        sys.path.pop(0)
    fetch = CRATE / "fetch" / "Cargo.toml"
    dest = CRATE / "vendor" / "quiche"
    stamp = dest / ".polykey-patched"
    want = hashlib.sha256(
        (CRATE / "patch_quiche.py").read_bytes()
        + (CRATE / "fetch" / "Cargo.lock").read_bytes()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return dest
    subprocess.run(
        [_cargo(), "fetch", "--locked", "--manifest-path", str(fetch)], check=True
    )
    source = _crate_dir(fetch, "quiche")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    try:
        patch_quiche.apply(dest)
    except RuntimeError as exc:
        _fail(str(exc))
    stamp.write_text(want)
    return dest


def cargo_build() -> Path:
    """Build the staticlib (a no-op when cached) and return its path."""
    cargo = _cargo()
    vendor_quiche()
    target = cache_dir()
    cmd = [
        cargo, "build", "--release", "--locked",
        "--manifest-path", str(CRATE / "Cargo.toml"),
        "--target-dir", str(target),
    ]  # fmt: skip
    print("setup_quiche:", " ".join(cmd), file=sys.stderr)
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as exc:
        _fail(
            f"cargo failed ({exc.returncode}); quiche needs cmake, libclang and "
            "a C/C++ compiler (see README.md)"
        )
    lib = target / "release" / LIB_NAME
    if not lib.exists():
        _fail(f"cargo finished but {lib} is missing")
    return lib


def quiche_include_dir() -> Path:
    """quiche's own include/ folder (in the vendored copy)."""
    include = vendor_quiche() / "include"
    if not (include / "quiche.h").exists():
        _fail(f"{include}/quiche.h is missing")
    return include


def make_ffibuilder() -> FFI:
    lib = cargo_build()
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF + SHIM_DECLS + RECV_DECLS)
    ffibuilder.set_source(
        "polykey.quic._quiche",
        "#include <sys/socket.h>\n#include <netinet/in.h>\n"
        '#include "quiche.h"\n' + SHIM_DECLS + _RECV_TYPE_C + RECV_SOURCE,
        include_dirs=[str(quiche_include_dir())],
        extra_objects=[str(lib)],
        libraries=["stdc++", "dl", "pthread", "m"],
        extra_link_args=["-Wl,--exclude-libs,ALL", "-Wl,--gc-sections"],
    )
    return ffibuilder


ffibuilder = make_ffibuilder()
