//! polykey's static library: quiche's C API (the `ffi` feature, re-exported
//! as is) plus a few `pk_*` functions that fill the gaps a peer-to-peer node
//! hits in that API:
//!
//! * `pk_config_new`: a `quiche_config` whose BoringSSL context takes the
//!   certificate chain and private key from memory, asks for the peer's
//!   certificate (on a server too), offers Ed25519 among the verify
//!   algorithms and accepts any chain in its verify callback. The real peer
//!   check happens in Python after the handshake, as js-quic does it.
//! * `pk_conn_peer_cert_chain_*`: the peer's whole chain as DER, leaf first,
//!   as the verify callback copied it; `_drop` frees that copy once read.
//! * `pk_conn_shed_handshake_config`: a server connection's `SSL` frees its
//!   handshake configuration once the handshake is over.
//! * `pk_conn_send_batch`: several `quiche_conn_send` calls into one buffer
//!   of equal-sized segments, ready for one GSO `sendmsg`, so Python makes one
//!   call per batch instead of one per packet.
//! * `pk_conn_dgram_route` / `pk_conn_dgram_send_segments`: QUIC packets
//!   carried inside DATAGRAM frames of another connection (a relayed
//!   connection), routed by a fixed-length prefix (the circuit id) without a
//!   trip through Python per packet: a relay swaps the prefix and queues the
//!   frame on the other connection, an end feeds the packet to its inner
//!   connection, a sender queues a whole GSO batch in one call.
//!
//! Everything here must stay panic-free: a panic across `extern "C"` aborts
//! the whole Python process.

use std::ffi::c_void;
use std::ptr;
use std::slice;
use std::sync::OnceLock;

use boring::ex_data::Index;
use boring::pkey::PKey;
use boring::ssl::Ssl;
use boring::ssl::SslContextBuilder;
use boring::ssl::SslMethod;
use boring::ssl::SslOptions;
use boring::ssl::SslRef;
use boring::ssl::SslSignatureAlgorithm;
use boring::ssl::SslVerifyError;
use boring::ssl::SslVerifyMode;
use boring::ssl::SslVersion;
use boring::x509::X509;
use foreign_types_shared::ForeignTypeRef;
use libc::c_char;
use libc::c_int;
use libc::size_t;
use libc::ssize_t;
use libc::sockaddr;
use libc::sockaddr_storage;
use libc::socklen_t;
use libc::timespec;

const QUICHE_ERR_DONE: ssize_t = -1;

// Make sure the quiche crate (and with it every `quiche_*` symbol of its
// C API) is linked into the archive.
pub use quiche;

/// Peer certificate modes for `pk_config_new`.
const PEER_CERT_NONE: c_int = 0;
const PEER_CERT_REQUEST: c_int = 1;
const PEER_CERT_REQUIRE: c_int = 2;

// BoringSSL's C API for what the boring crate does not wrap.
extern "C" {
    fn SSL_CTX_set_retain_only_sha256_of_client_certs(ctx: *mut c_void, enable: c_int);
    fn SSL_get0_peer_certificates(ssl: *const c_void) -> *const c_void;
    fn SSL_set_shed_handshake_config(ssl: *mut c_void, enable: c_int);
    fn sk_num(stack: *const c_void) -> size_t;
    fn sk_value(stack: *const c_void, index: size_t) -> *const c_void;
    fn CRYPTO_BUFFER_len(buf: *const c_void) -> size_t;
    fn CRYPTO_BUFFER_data(buf: *const c_void) -> *const u8;
}

/// The peer's chain as DER, leaf first, as the verify callback saw it.
type PeerChain = Vec<Vec<u8>>;

/// The `SSL` ex_data slot that holds each connection's `PeerChain`.
fn chain_index() -> Option<Index<Ssl, PeerChain>> {
    static INDEX: OnceLock<Option<Index<Ssl, PeerChain>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// The certificates the peer sent, from the handshake's session (the
/// CRYPTO_BUFFERs, not the X509 objects, which drop the leaf on a server).
fn peer_chain_der(ssl: &SslRef) -> PeerChain {
    let mut chain = Vec::new();
    unsafe {
        let stack = SSL_get0_peer_certificates(ssl.as_ptr() as *const c_void);
        if stack.is_null() {
            return chain;
        }
        for i in 0..sk_num(stack) {
            let buf = sk_value(stack, i);
            if buf.is_null() {
                break;
            }
            chain.push(input(CRYPTO_BUFFER_data(buf), CRYPTO_BUFFER_len(buf)).to_vec());
        }
    }
    chain
}

fn conn_ssl(conn: &quiche::Connection) -> &mut SslRef {
    // The `SSL` lives as long as the connection (patch_quiche.py).
    unsafe { SslRef::from_ptr_mut(conn.pk_ssl() as *mut _) }
}

fn write_error(buf: *mut c_char, buf_len: size_t, msg: &str) {
    if buf.is_null() || buf_len == 0 {
        return;
    }
    let bytes = msg.as_bytes();
    let n = bytes.len().min(buf_len - 1);
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
}

fn input<'a>(data: *const u8, len: size_t) -> &'a [u8] {
    if data.is_null() || len == 0 {
        &[]
    } else {
        unsafe { slice::from_raw_parts(data, len) }
    }
}

fn is_pem(data: &[u8]) -> bool {
    let start = data.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0);
    data[start..].starts_with(b"-----BEGIN")
}

/// Length of the DER TLV at the start of `data`, or None if it is not one.
fn der_len(data: &[u8]) -> Option<usize> {
    if data.len() < 2 {
        return None;
    }
    let first = data[1] as usize;
    if first < 0x80 {
        return Some(2 + first);
    }
    let n = first & 0x7f;
    if n == 0 || n > 4 || data.len() < 2 + n {
        return None;
    }
    let mut len = 0usize;
    for b in &data[2..2 + n] {
        len = (len << 8) | *b as usize;
    }
    Some(2 + n + len)
}

/// A chain as PEM (one or more blocks) or as DER certificates back to back.
fn parse_chain(data: &[u8]) -> Result<Vec<X509>, String> {
    if data.is_empty() {
        return Err("empty certificate chain".into());
    }
    if is_pem(data) {
        let certs = X509::stack_from_pem(data)
            .map_err(|e| format!("certificate chain PEM: {e}"))?;
        if certs.is_empty() {
            return Err("certificate chain PEM holds no certificate".into());
        }
        return Ok(certs);
    }
    let mut certs = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = der_len(rest)
            .filter(|n| *n <= rest.len())
            .ok_or_else(|| "certificate chain DER is truncated".to_string())?;
        let cert = X509::from_der(&rest[..n])
            .map_err(|e| format!("certificate chain DER: {e}"))?;
        certs.push(cert);
        rest = &rest[n..];
    }
    Ok(certs)
}

fn build_context(
    chain: &[u8], key: &[u8], peer_cert: c_int,
) -> Result<SslContextBuilder, String> {
    let certs = parse_chain(chain)?;
    let key = if is_pem(key) {
        PKey::private_key_from_pem(key)
    } else {
        PKey::private_key_from_der(key)
    }
    .map_err(|e| format!("private key: {e}"))?;

    let leaf_key = certs[0]
        .public_key()
        .map_err(|e| format!("certificate public key: {e}"))?;
    if !leaf_key.public_eq(&key) {
        return Err("private key does not match the certificate".into());
    }

    let mut b = SslContextBuilder::new(SslMethod::tls())
        .map_err(|e| format!("SSL_CTX_new: {e}"))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| format!("TLS version: {e}"))?;
    b.set_certificate(&certs[0])
        .map_err(|e| format!("certificate: {e}"))?;
    for cert in certs.into_iter().skip(1) {
        b.add_extra_chain_cert(cert)
            .map_err(|e| format!("chain certificate: {e}"))?;
    }
    b.set_private_key(&key).map_err(|e| format!("private key: {e}"))?;

    // BoringSSL leaves Ed25519 out of its default verify list; Polykey's
    // node certificates are Ed25519, so offer it first.
    b.set_verify_algorithm_prefs(&[
        SslSignatureAlgorithm::ED25519,
        SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
        SslSignatureAlgorithm::RSA_PKCS1_SHA256,
        SslSignatureAlgorithm::ECDSA_SECP384R1_SHA384,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384,
        SslSignatureAlgorithm::RSA_PKCS1_SHA384,
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512,
        SslSignatureAlgorithm::RSA_PKCS1_SHA512,
    ])
    .map_err(|e| format!("verify algorithms: {e}"))?;

    let mode = match peer_cert {
        PEER_CERT_NONE => SslVerifyMode::NONE,
        PEER_CERT_REQUEST => SslVerifyMode::PEER,
        PEER_CERT_REQUIRE => {
            SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
        },
        _ => return Err(format!("unknown peer certificate mode {peer_cert}")),
    };
    // Accept any chain here: the application verifies it after the
    // handshake, against node identities rather than a CA store. Keep a
    // copy of it for that check: on a server, BoringSSL keeps only the
    // leaf's SHA-256 once the handshake is over, instead of the chain and
    // an X509 object per certificate for the connection's whole life.
    let index = chain_index().ok_or("SSL_get_ex_new_index failed")?;
    b.set_custom_verify_callback(mode, move |ssl| {
        let chain = peer_chain_der(ssl);
        ssl.set_ex_data(index, chain);
        Ok::<(), SslVerifyError>(())
    });
    unsafe {
        SSL_CTX_set_retain_only_sha256_of_client_certs(b.as_ptr() as *mut c_void, 1);
    }
    // No session resumption: a ticket is work and memory for nothing.
    b.set_options(SslOptions::NO_TICKET);
    Ok(b)
}

/// A `quiche_config` with an in-memory identity. Returns NULL and writes a
/// NUL-terminated message to `err` on failure. `peer_cert`: 0 none,
/// 1 request, 2 require.
#[no_mangle]
pub extern "C" fn pk_config_new(
    version: u32, chain: *const u8, chain_len: size_t, key: *const u8,
    key_len: size_t, peer_cert: c_int, err: *mut c_char, err_len: size_t,
) -> *mut quiche::Config {
    let result = build_context(
        input(chain, chain_len),
        input(key, key_len),
        peer_cert,
    )
    .and_then(|b| {
        quiche::Config::with_boring_ssl_ctx_builder(version, b)
            .map_err(|e| format!("quiche config: {e}"))
    });
    match result {
        Ok(config) => Box::into_raw(Box::new(config)),
        Err(msg) => {
            write_error(err, err_len, &msg);
            ptr::null_mut()
        },
    }
}

fn saved_chain(conn: &quiche::Connection) -> Option<&PeerChain> {
    conn_ssl(conn).ex_data(chain_index()?)
}

/// Number of certificates the peer sent (0 before its certificate came, or
/// after `pk_conn_peer_cert_chain_drop`).
#[no_mangle]
pub extern "C" fn pk_conn_peer_cert_chain_len(conn: &quiche::Connection) -> size_t {
    saved_chain(conn).map_or(0, |c| c.len())
}

/// The `index`th certificate of the peer's chain as DER, leaf first. The
/// pointer is valid until the connection is next used; copy it at once.
#[no_mangle]
pub extern "C" fn pk_conn_peer_cert_chain_get(
    conn: &quiche::Connection, index: size_t, out: &mut *const u8,
    out_len: &mut size_t,
) -> bool {
    match saved_chain(conn).and_then(|c| c.get(index)) {
        Some(der) => {
            *out = der.as_ptr();
            *out_len = der.len();
            true
        },
        None => {
            *out_len = 0;
            false
        },
    }
}

/// Frees the copy of the peer's chain, once the application has its own.
#[no_mangle]
pub extern "C" fn pk_conn_peer_cert_chain_drop(conn: &quiche::Connection) {
    if let Some(index) = chain_index() {
        conn_ssl(conn).replace_ex_data(index, Vec::new());
    }
}

/// Lets the connection's `SSL` free its handshake configuration (its own
/// copies of what the context set: certificate and key references, verify
/// and group preferences, the transport parameters we sent) once the
/// handshake is done, instead of holding it for the connection's life.
/// For server connections: nothing reads that configuration after the
/// handshake, and a server never calls `SSL_clear` (a client does, when a
/// Retry or version negotiation restarts its handshake).
#[no_mangle]
pub extern "C" fn pk_conn_shed_handshake_config(conn: &quiche::Connection) {
    unsafe { SSL_set_shed_handshake_config(conn_ssl(conn).as_ptr() as *mut c_void, 1) }
}

/// Mirror of quiche.h's `quiche_send_info`.
#[repr(C)]
pub struct SendInfo {
    from: sockaddr_storage,
    from_len: socklen_t,
    to: sockaddr_storage,
    to_len: socklen_t,
    at: timespec,
}

/// Mirror of quiche.h's `quiche_recv_info`.
#[repr(C)]
pub struct RecvInfo {
    from: *mut sockaddr,
    from_len: socklen_t,
    to: *mut sockaddr,
    to_len: socklen_t,
}

extern "C" {
    fn quiche_conn_recv(
        conn: *mut quiche::Connection, buf: *mut u8, buf_len: size_t,
        info: *const RecvInfo,
    ) -> ssize_t;
    fn quiche_conn_send(
        conn: *mut quiche::Connection, out: *mut u8, out_len: size_t,
        out_info: *mut SendInfo,
    ) -> ssize_t;
    fn quiche_conn_dgram_recv(
        conn: *mut quiche::Connection, buf: *mut u8, buf_len: size_t,
    ) -> ssize_t;
    fn quiche_conn_dgram_send(
        conn: *mut quiche::Connection, buf: *const u8, buf_len: size_t,
    ) -> ssize_t;
    fn quiche_conn_send_on_path(
        conn: *mut quiche::Connection, out: *mut u8, out_len: size_t,
        from: *const sockaddr, from_len: socklen_t, to: *const sockaddr,
        to_len: socklen_t, out_info: *mut SendInfo,
    ) -> ssize_t;
}

/// Fill `out` with up to `max_segments` packets from quiche, each the size
/// of the first except possibly a shorter last one (the GSO rule), all on
/// the first packet's path. Returns the bytes written, 0 when there is
/// nothing to send, or a negative quiche error code from the first send;
/// `segment_size` gets the first packet's size and `info` its send info.
#[no_mangle]
pub extern "C" fn pk_conn_send_batch(
    conn: *mut quiche::Connection, out: *mut u8, out_len: size_t,
    max_segments: size_t, segment_size: &mut size_t, info: &mut SendInfo,
) -> ssize_t {
    *segment_size = 0;
    if conn.is_null() || out.is_null() || out_len == 0 {
        return 0;
    }
    let first = unsafe { quiche_conn_send(conn, out, out_len, info) };
    if first <= 0 {
        return if first == QUICHE_ERR_DONE { 0 } else { first };
    }
    let seg = first as usize;
    *segment_size = seg;
    let mut written = seg;
    let mut count = 1;
    // One scratch info: later packets share the first one's path.
    let mut scratch: SendInfo = unsafe { std::mem::zeroed() };
    while count < max_segments && out_len - written >= seg {
        let n = unsafe {
            quiche_conn_send_on_path(
                conn,
                out.add(written),
                seg,
                &info.from as *const _ as *const sockaddr,
                info.from_len,
                &info.to as *const _ as *const sockaddr,
                info.to_len,
                &mut scratch,
            )
        };
        if n <= 0 {
            break;
        }
        written += n as usize;
        count += 1;
        // A short packet must end a GSO batch.
        if (n as usize) < seg {
            break;
        }
    }
    written as ssize_t
}

/// Feed quiche the packets of one GRO buffer: consecutive `segment`-sized
/// datagrams (the last may be shorter) from one sender. Stops before the
/// first datagram that is not a short-header packet for `dcid`, which the
/// caller routes on its own (two connections can share one 5-tuple). Errors
/// on single packets are ignored, as quiche drops bad packets by itself and
/// closes the connection on fatal ones. Returns the bytes consumed.
#[no_mangle]
pub extern "C" fn pk_conn_recv_segments(
    conn: *mut quiche::Connection, buf: *mut u8, len: size_t, segment: size_t,
    dcid: *const u8, dcid_len: size_t, info: *const RecvInfo,
) -> size_t {
    if conn.is_null() || buf.is_null() || info.is_null() || segment == 0 {
        return 0;
    }
    let cid = input(dcid, dcid_len);
    let mut off = 0usize;
    while off < len {
        let n = segment.min(len - off);
        let packet = unsafe { slice::from_raw_parts(buf.add(off), n) };
        let short = n > cid.len() && packet[0] & 0x80 == 0;
        if !short || &packet[1..1 + cid.len()] != cid {
            break;
        }
        unsafe { quiche_conn_recv(conn, buf.add(off), n, info) };
        off += n;
    }
    off
}

/// The longest prefix (circuit id) and connection id a route matches.
const ROUTE_PREFIX_MAX: usize = 16;
const ROUTE_CID_MAX: usize = 20;
/// Route kinds: unused, forward to another connection's datagrams, deliver
/// to an inner connection as a received packet.
const ROUTE_NONE: u32 = 0;
const ROUTE_FORWARD: u32 = 1;
const ROUTE_DELIVER: u32 = 2;

/// One datagram route of a connection; the caller owns the array and keeps
/// `out` (and `info`) alive while the route is in it.
#[repr(C)]
pub struct DgramRoute {
    kind: u32,
    /// Datagrams starting with these `prefix_len` bytes take this route.
    prefix: [u8; ROUTE_PREFIX_MAX],
    out: *mut quiche::Connection,
    /// Forward: the prefix swapped in, and the payload bytes the route may
    /// still carry (a datagram that would pass it goes back to the caller).
    out_prefix: [u8; ROUTE_PREFIX_MAX],
    budget: u64,
    /// Deliver: only short-header packets for this connection id (anything
    /// else, a handshake packet or a migrated id, goes back to the caller),
    /// fed to `out` as arriving from `info`.
    dcid: [u8; ROUTE_CID_MAX],
    dcid_len: size_t,
    info: *const RecvInfo,
    /// Counters, only ever added to: datagrams taken, their payload bytes,
    /// and of them those the other connection's queue refused (forward).
    datagrams: u64,
    bytes: u64,
    dropped: u64,
}

fn take(route: &mut DgramRoute, data: *mut u8, n: usize, plen: usize) -> bool {
    let payload = n - plen;
    match route.kind {
        ROUTE_FORWARD => {
            if payload as u64 > route.budget {
                return false;
            }
            unsafe {
                ptr::copy_nonoverlapping(route.out_prefix.as_ptr(), data, plen);
            }
            let rc = unsafe { quiche_conn_dgram_send(route.out, data, n) };
            if rc < 0 {
                route.dropped += 1;
            }
            route.budget -= payload as u64;
        },
        ROUTE_DELIVER => {
            let packet = unsafe { slice::from_raw_parts(data.add(plen), payload) };
            let cid = &route.dcid[..route.dcid_len.min(ROUTE_CID_MAX)];
            if payload <= cid.len() + 1
                || packet[0] & 0x80 != 0
                || &packet[1..1 + cid.len()] != cid
            {
                return false;
            }
            // Errors on single packets are quiche's to handle, as in
            // pk_conn_recv_segments.
            unsafe { quiche_conn_recv(route.out, data.add(plen), payload, route.info) };
        },
        _ => return false,
    }
    route.datagrams += 1;
    route.bytes += payload as u64;
    true
}

/// Drain `conn`'s received DATAGRAM frames through `routes`: each frame of
/// more than `prefix_len` bytes whose prefix names a route is taken by it
/// (forwarded or delivered, counted). Stops at the first frame no route
/// takes, leaving it in `buf`, and returns its length for the caller to
/// handle (then it calls again); returns QUICHE_ERR_DONE when the queue is
/// empty, or another negative quiche error.
#[no_mangle]
pub extern "C" fn pk_conn_dgram_route(
    conn: *mut quiche::Connection, routes: *mut DgramRoute, n_routes: size_t,
    prefix_len: size_t, buf: *mut u8, buf_len: size_t,
) -> ssize_t {
    if conn.is_null() || buf.is_null() || prefix_len > ROUTE_PREFIX_MAX {
        return QUICHE_ERR_DONE;
    }
    let routes: &mut [DgramRoute] = if routes.is_null() || n_routes == 0 {
        &mut []
    } else {
        unsafe { slice::from_raw_parts_mut(routes, n_routes) }
    };
    loop {
        let rc = unsafe { quiche_conn_dgram_recv(conn, buf, buf_len) };
        if rc < 0 {
            return rc;
        }
        let n = rc as usize;
        if n <= prefix_len {
            return rc;
        }
        let prefix = unsafe { slice::from_raw_parts(buf, prefix_len) };
        let found = routes.iter_mut().find(|r| {
            r.kind != ROUTE_NONE && !r.out.is_null() && &r.prefix[..prefix_len] == prefix
        });
        let taken = match found {
            Some(route) => take(route, buf, n, prefix_len),
            None => false,
        };
        if !taken {
            return rc;
        }
    }
}

/// Queue the packets of `data` (`segment` bytes each, the last may be
/// shorter: a send batch) on `conn` as DATAGRAM frames, each `prefix` then
/// the packet, built in `scratch`. Returns how many were queued; the rest
/// the queue refused (dropped, as a lossy link drops them).
#[no_mangle]
pub extern "C" fn pk_conn_dgram_send_segments(
    conn: *mut quiche::Connection, prefix: *const u8, prefix_len: size_t,
    data: *const u8, len: size_t, segment: size_t, scratch: *mut u8,
    scratch_len: size_t,
) -> size_t {
    if conn.is_null()
        || data.is_null()
        || scratch.is_null()
        || segment == 0
        || (prefix.is_null() && prefix_len > 0)
    {
        return 0;
    }
    if prefix_len + segment.min(len) > scratch_len {
        return 0;
    }
    if prefix_len > 0 {
        unsafe { ptr::copy_nonoverlapping(prefix, scratch, prefix_len) };
    }
    let mut queued = 0;
    let mut off = 0usize;
    while off < len {
        let n = segment.min(len - off);
        unsafe {
            ptr::copy_nonoverlapping(data.add(off), scratch.add(prefix_len), n);
            if quiche_conn_dgram_send(conn, scratch, prefix_len + n) >= 0 {
                queued += 1;
            }
        }
        off += n;
    }
    queued
}
