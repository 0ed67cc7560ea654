//! Native baseline for bench/quic.py: the quiche crate polykey binds (the
//! vendored, patched 0.29.3 copy), driven by the simplest loop that does the
//! job well: one non-blocking std `UdpSocket`, `poll(2)` to wait, drain the
//! socket, flush with UDP GSO (one `sendmsg` per batch) where the kernel has
//! it, one thread, no mio, no async runtime.
//!
//!   bench-native server --listen 127.0.0.1:0 --cert C.pem --key K.pem [--no-retry]
//!       prints "READY <port>", serves until its stdin reaches EOF. For every stream it reads
//!       to FIN; a stream of at most 1024 bytes is echoed back, a longer one is
//!       answered with its length in decimal; then FIN. Stateless Retry is on
//!       by default, like polykey's and js-quic's servers.
//!   bench-native client --connect 127.0.0.1:PORT --mode bulk --size BYTES
//!   bench-native client --connect ... --mode rr --seconds S
//!   bench-native client --connect ... --mode hs --seconds S
//!   bench-native client --connect ... --mode idle --count N --concurrency K
//!       each prints one JSON line. `idle` prints "WARM" after one connection,
//!       waits for a line on stdin, opens N more connections, prints JSON,
//!       then holds them until stdin reaches EOF.
//!
//! Transport settings follow polykey's QUICConfig defaults (ALPN "quic",
//! 1350-byte datagrams, 10 MiB / 1 MiB initial credit, windows up to 24 / 16
//! MiB, 100 streams, cubic, no pacing). Neither side verifies the peer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const MAX_DATAGRAM: usize = 1350;
const CID_LEN: usize = 16;
const ECHO_LIMIT: usize = 1024;
/// 48 * 1350 = 64800 bytes: one GSO send stays under 64 KiB.
const GSO_SEGMENTS: usize = 48;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
const SOCKET_BUFFER: libc::c_int = 4 * 1024 * 1024;

type Cid = [u8; CID_LEN];

// -- small helpers ---------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut seed = [0u8; 8];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .expect("urandom");
        Rng(u64::from_le_bytes(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn cid(&mut self) -> Cid {
        let mut out = [0u8; CID_LEN];
        out[..8].copy_from_slice(&self.next().to_le_bytes());
        out[8..].copy_from_slice(&self.next().to_le_bytes());
        out
    }
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut i = 0;
        while i < items.len() {
            let key = items[i].trim_start_matches("--").to_string();
            if i + 1 < items.len() && !items[i + 1].starts_with("--") {
                map.insert(key, items[i + 1].clone());
                i += 2;
            } else {
                map.insert(key, String::new());
                i += 1;
            }
        }
        Args(map)
    }

    fn get(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, key: &str, default: f64) -> f64 {
        self.0.get(key).map_or(default, |v| v.parse().expect(key))
    }

    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

fn dcid_of(pkt: &[u8]) -> Option<Cid> {
    // Every connection id in this program is CID_LEN bytes long.
    if pkt.is_empty() {
        return None;
    }
    let (start, len) = if pkt[0] & 0x80 == 0 {
        (1, CID_LEN)
    } else {
        if pkt.len() < 6 {
            return None;
        }
        (6, pkt[5] as usize)
    };
    if len != CID_LEN || pkt.len() < start + CID_LEN {
        return None;
    }
    let mut out = [0u8; CID_LEN];
    out.copy_from_slice(&pkt[start..start + CID_LEN]);
    Some(out)
}

fn config(args: &Args, server: bool) -> quiche::Config {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    if server {
        c.load_cert_chain_from_pem_file(&args.get("cert", "cert.pem"))
            .expect("cert");
        c.load_priv_key_from_pem_file(&args.get("key", "key.pem"))
            .expect("key");
    }
    c.verify_peer(false);
    c.set_application_protos(&[b"quic"]).unwrap();
    c.set_max_idle_timeout(args.num("idle-ms", 60_000.0) as u64);
    c.set_max_recv_udp_payload_size(MAX_DATAGRAM);
    c.set_max_send_udp_payload_size(MAX_DATAGRAM);
    c.set_initial_max_data(10 * 1024 * 1024);
    c.set_initial_max_stream_data_bidi_local(1024 * 1024);
    c.set_initial_max_stream_data_bidi_remote(1024 * 1024);
    c.set_initial_max_stream_data_uni(1024 * 1024);
    c.set_initial_max_streams_bidi(100);
    c.set_initial_max_streams_uni(100);
    c.set_max_connection_window(24 * 1024 * 1024);
    c.set_max_stream_window(16 * 1024 * 1024);
    c.set_cc_algorithm_name("cubic").unwrap();
    c.grease(true);
    c.enable_pacing(false);
    c.set_disable_active_migration(true);
    c
}

// -- the socket --------------------------------------------------------------

struct Io {
    sock: UdpSocket,
    local: SocketAddr,
    gso: bool,
    gro: bool,
    out: Vec<u8>,
    datagrams_sent: u64,
}

impl Io {
    fn bind(addr: &str) -> Io {
        let sock = UdpSocket::bind(addr).expect("bind");
        sock.set_nonblocking(true).unwrap();
        let fd = sock.as_raw_fd();
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &SOCKET_BUFFER as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let gso = unsafe {
            libc::getsockopt(
                fd,
                SOL_UDP,
                UDP_SEGMENT,
                &mut val as *mut _ as *mut libc::c_void,
                &mut len,
            )
        } == 0
            && std::env::var_os("BENCH_NATIVE_NO_GSO").is_none();
        let one: libc::c_int = 1;
        let gro = std::env::var_os("BENCH_NATIVE_NO_GRO").is_none()
            && unsafe {
                libc::setsockopt(
                    fd,
                    SOL_UDP,
                    UDP_GRO,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            } == 0;
        let local = sock.local_addr().unwrap();
        Io {
            sock,
            local,
            gso,
            gro,
            out: vec![0u8; GSO_SEGMENTS * MAX_DATAGRAM],
            datagrams_sent: 0,
        }
    }

    /// Wait until the socket (or `extra`, e.g. stdin) is readable or the
    /// timeout passes. Returns (socket readable, extra readable).
    fn wait(&self, timeout: Option<Duration>, extra: Option<i32>) -> (bool, bool) {
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: extra.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = match timeout {
            None => -1,
            Some(d) => d.as_micros().div_ceil(1000).min(60_000) as libc::c_int,
        };
        let n = if extra.is_some() { 2 } else { 1 };
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        if r <= 0 {
            return (false, false);
        }
        (fds[0].revents != 0, n == 2 && fds[1].revents != 0)
    }

    /// One read: (bytes, sender, segment size). With GRO the kernel may
    /// hand us several packets of one sender back to back, `segment` bytes
    /// each (the last may be shorter).
    fn recv(&self, buf: &mut [u8]) -> Option<(usize, SocketAddr, usize)> {
        loop {
            let r = if self.gro {
                recv_gro(self.sock.as_raw_fd(), buf)
            } else {
                self.sock.recv_from(buf).map(|(n, from)| (n, from, n))
            };
            match r {
                Ok((n, from, seg)) => return Some((n, from, if seg == 0 { n } else { seg })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors (a peer that went away): not ours to handle.
                Err(_) => return None,
            }
        }
    }

    fn send_raw(&mut self, start: usize, len: usize, segment: usize, to: SocketAddr) {
        let data = &self.out[start..start + len];
        loop {
            let r = if len <= segment || !self.gso {
                self.sock.send_to(data, to).map(|_| ())
            } else {
                send_gso(self.sock.as_raw_fd(), data, segment, &to)
            };
            match r {
                Ok(()) => {
                    self.datagrams_sent += len.div_ceil(segment) as u64;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.sock.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // UDP is lossy; QUIC recovers.
            }
        }
    }

    /// Send everything quiche has for `conn`, in GSO batches of equal-sized
    /// packets (the last of a batch may be shorter).
    fn flush(&mut self, conn: &mut quiche::Connection) {
        let max = if self.gso { GSO_SEGMENTS } else { 1 };
        let (mut off, mut count, mut segment) = (0usize, 0usize, 0usize);
        let mut to = self.local;
        loop {
            match conn.send(&mut self.out[off..off + MAX_DATAGRAM]) {
                Ok((written, info)) => {
                    if count > 0 && (written > segment || info.to != to) {
                        // Does not fit this batch: send the batch, then
                        // start the next one with this packet.
                        self.send_raw(0, off, segment, to);
                        self.out.copy_within(off..off + written, 0);
                        (off, count, segment, to) = (0, 0, 0, info.to);
                    }
                    if count == 0 {
                        segment = written;
                        to = info.to;
                    }
                    off += written;
                    count += 1;
                    if written < segment || count == max {
                        self.send_raw(0, off, segment, to);
                        (off, count) = (0, 0);
                    }
                }
                Err(_) => {
                    // Done, or the connection is closed.
                    if count > 0 {
                        self.send_raw(0, off, segment, to);
                    }
                    return;
                }
            }
        }
    }
}

fn recv_gro(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut segment = 0usize;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                segment =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int) as usize;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        let from = SocketAddr::from((ip, u16::from_be(addr.sin_port)));
        Ok((n as usize, from, segment))
    }
}

fn send_gso(fd: i32, data: &[u8], segment: usize, to: &SocketAddr) -> io::Result<()> {
    let SocketAddr::V4(v4) = to else {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    };
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = v4.port().to_be();
        addr.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment as u16);
        if libc::sendmsg(fd, &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads what is waiting on stdin; true at EOF.
fn stdin_closed() -> bool {
    let mut buf = [0u8; 256];
    let n = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    n <= 0
}

fn recv_info(io: &Io, from: SocketAddr) -> quiche::RecvInfo {
    quiche::RecvInfo { from, to: io.local }
}

fn expired(conn: &quiche::Connection) -> bool {
    conn.timeout().is_some_and(|t| t.is_zero())
}

// -- server --------------------------------------------------------------------

#[derive(Default)]
struct StreamState {
    total: usize,
    head: Vec<u8>,
}

struct ServerConn {
    conn: quiche::Connection,
    streams: HashMap<u64, StreamState>,
}

fn mint_token(hdr: &quiche::Header, from: &SocketAddr) -> Vec<u8> {
    let mut token = b"polykey-bench".to_vec();
    token.extend_from_slice(from.to_string().as_bytes());
    token.push(0);
    token.extend_from_slice(&hdr.dcid);
    token
}

fn validate_token(token: &[u8], from: &SocketAddr) -> Option<Vec<u8>> {
    let mut prefix = b"polykey-bench".to_vec();
    prefix.extend_from_slice(from.to_string().as_bytes());
    prefix.push(0);
    token
        .strip_prefix(prefix.as_slice())
        .map(|odcid| odcid.to_vec())
}

fn serve_streams(sc: &mut ServerConn, buf: &mut [u8]) {
    let conn = &mut sc.conn;
    for sid in conn.readable() {
        loop {
            match conn.stream_recv(sid, buf) {
                Ok((n, fin)) => {
                    let st = sc.streams.entry(sid).or_default();
                    st.total += n;
                    if st.head.len() <= ECHO_LIMIT {
                        let take = n.min(ECHO_LIMIT + 1 - st.head.len());
                        st.head.extend_from_slice(&buf[..take]);
                    }
                    if fin {
                        let st = sc.streams.remove(&sid).unwrap();
                        let reply = if st.total <= ECHO_LIMIT {
                            st.head
                        } else {
                            st.total.to_string().into_bytes()
                        };
                        let _ = conn.stream_send(sid, &reply, true);
                        break;
                    }
                }
                Err(_) => {
                    if conn.stream_finished(sid) {
                        sc.streams.remove(&sid);
                    }
                    break;
                }
            }
        }
    }
}

fn server(args: &Args) {
    let mut io = Io::bind(&args.get("listen", "127.0.0.1:0"));
    let mut cfg = config(args, true);
    let retry = !args.flag("no-retry");
    let mut rng = Rng::new();
    let mut conns: HashMap<Cid, ServerConn> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut stream_buf = vec![0u8; 65536];
    let mut packet = [0u8; MAX_DATAGRAM];
    let mut dirty: Vec<Cid> = Vec::new();
    println!("READY {}", io.local.port());
    io::stdout().flush().unwrap();
    loop {
        let timeout = conns.values().filter_map(|c| c.conn.timeout()).min();
        let (readable, stdin) = io.wait(timeout, Some(0));
        if stdin && stdin_closed() {
            return; // the driver closed our stdin: stop
        }
        if readable {
            while let Some((total, from, seg)) = io.recv(&mut buf) {
                for start in (0..total).step_by(seg) {
                    let pkt = &mut buf[start..total.min(start + seg)];
                    if let Some(cid) = dcid_of(pkt) {
                        if let Some(sc) = conns.get_mut(&cid) {
                            let _ = sc.conn.recv(pkt, recv_info(&io, from));
                            dirty.push(cid);
                            continue;
                        }
                    }
                    let Ok(hdr) = quiche::Header::from_slice(pkt, CID_LEN) else {
                        continue;
                    };
                    if hdr.ty != quiche::Type::Initial {
                        continue;
                    }
                    if !quiche::version_is_supported(hdr.version) {
                        if let Ok(len) =
                            quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut packet)
                        {
                            let _ = io.sock.send_to(&packet[..len], from);
                        }
                        continue;
                    }
                    let mut scid = rng.cid();
                    let mut odcid = None;
                    if !retry && hdr.dcid.len() == CID_LEN {
                        // Use the client's chosen id as ours: its retransmitted
                        // Initials then find this connection.
                        scid.copy_from_slice(&hdr.dcid);
                    }
                    if retry {
                        let token = hdr.token.as_deref().unwrap_or(&[]);
                        if token.is_empty() {
                            let new_token = mint_token(&hdr, &from);
                            let new_scid = quiche::ConnectionId::from_ref(&scid);
                            if let Ok(len) = quiche::retry(
                                &hdr.scid,
                                &hdr.dcid,
                                &new_scid,
                                &new_token,
                                hdr.version,
                                &mut packet,
                            ) {
                                let _ = io.sock.send_to(&packet[..len], from);
                            }
                            continue;
                        }
                        let Some(o) = validate_token(token, &from) else {
                            continue;
                        };
                        if hdr.dcid.len() != CID_LEN {
                            continue;
                        }
                        scid.copy_from_slice(&hdr.dcid);
                        odcid = Some(quiche::ConnectionId::from_vec(o));
                    }
                    let cid_ref = quiche::ConnectionId::from_ref(&scid);
                    let Ok(conn) =
                        quiche::accept(&cid_ref, odcid.as_ref(), io.local, from, &mut cfg)
                    else {
                        continue;
                    };
                    let mut sc = ServerConn {
                        conn,
                        streams: HashMap::new(),
                    };
                    let _ = sc.conn.recv(pkt, recv_info(&io, from));
                    conns.insert(scid, sc);
                    dirty.push(scid);
                }
            }
        }
        // Timers.
        if timeout.is_some_and(|t| t.is_zero()) || !readable {
            for (cid, sc) in conns.iter_mut() {
                if expired(&sc.conn) {
                    sc.conn.on_timeout();
                    dirty.push(*cid);
                }
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        let mut closed = false;
        for cid in dirty.drain(..) {
            if let Some(sc) = conns.get_mut(&cid) {
                if sc.conn.is_established() {
                    serve_streams(sc, &mut stream_buf);
                }
                io.flush(&mut sc.conn);
                closed |= sc.conn.is_closed();
            }
        }
        if closed {
            conns.retain(|_, sc| !sc.conn.is_closed());
        }
    }
}

// -- clients ---------------------------------------------------------------------

struct Client {
    io: Io,
    cfg: quiche::Config,
    peer: SocketAddr,
    rng: Rng,
    buf: Vec<u8>,
}

impl Client {
    fn new(args: &Args) -> Client {
        let peer: SocketAddr = args
            .get("connect", "127.0.0.1:4433")
            .parse()
            .expect("connect");
        Client {
            io: Io::bind("127.0.0.1:0"),
            cfg: config(args, false),
            peer,
            rng: Rng::new(),
            buf: vec![0u8; 65536],
        }
    }

    fn connect(&mut self) -> (Cid, quiche::Connection) {
        let scid = self.rng.cid();
        let conn = quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&scid),
            self.io.local,
            self.peer,
            &mut self.cfg,
        )
        .expect("connect");
        (scid, conn)
    }

    /// Flush, wait for input or the timer, feed what arrived to `conn`.
    fn pump(&mut self, scid: &Cid, conn: &mut quiche::Connection) {
        self.io.flush(conn);
        let (readable, _) = self.io.wait(conn.timeout(), None);
        if readable {
            while let Some((total, from, seg)) = self.io.recv(&mut self.buf) {
                for start in (0..total).step_by(seg) {
                    let pkt = &mut self.buf[start..total.min(start + seg)];
                    if dcid_of(pkt).as_ref() == Some(scid) {
                        let _ = conn.recv(pkt, recv_info(&self.io, from));
                    }
                }
            }
        }
        if !readable || expired(conn) {
            conn.on_timeout();
        }
    }

    fn established(&mut self) -> (Cid, quiche::Connection) {
        let (scid, mut conn) = self.connect();
        while !conn.is_established() {
            assert!(
                !conn.is_closed(),
                "handshake failed: {:?}",
                conn.peer_error()
            );
            self.pump(&scid, &mut conn);
        }
        (scid, conn)
    }
}

fn read_reply(
    conn: &mut quiche::Connection,
    sid: u64,
    reply: &mut Vec<u8>,
    buf: &mut [u8],
) -> bool {
    while let Ok((n, fin)) = conn.stream_recv(sid, buf) {
        reply.extend_from_slice(&buf[..n]);
        if fin {
            return true;
        }
    }
    false
}

fn bulk(args: &Args) {
    let mut size = args.num("size", 256.0 * 1024.0 * 1024.0) as usize;
    let requested = size;
    let max_time = Duration::from_secs_f64(args.num("max-seconds", 60.0));
    let mut c = Client::new(args);
    let (scid, mut conn) = c.established();
    let chunk = vec![0xA5u8; 256 * 1024];
    let mut rbuf = vec![0u8; 4096];
    let mut reply = Vec::new();
    let sid = 0;
    let mut sent = 0;
    let mut fin_pending = false;
    let start = Instant::now();
    loop {
        if sent < size && start.elapsed() > max_time {
            // Time cap: finish the stream with what was sent so far.
            size = sent;
            fin_pending = true;
        }
        if fin_pending && conn.stream_send(sid, &[], true).is_ok() {
            fin_pending = false;
        }
        while sent < size {
            let n = chunk.len().min(size - sent);
            match conn.stream_send(sid, &chunk[..n], sent + n == size) {
                Ok(w) => {
                    sent += w;
                    if w < n {
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(e) => panic!("stream_send: {e:?}"),
            }
        }
        if read_reply(&mut conn, sid, &mut reply, &mut rbuf) {
            break;
        }
        assert!(!conn.is_closed(), "connection closed during bulk");
        c.pump(&scid, &mut conn);
    }
    let secs = start.elapsed().as_secs_f64();
    let got: usize = String::from_utf8_lossy(&reply).parse().unwrap_or(0);
    assert_eq!(got, size, "server received {got} of {size} bytes");
    let _ = conn.close(true, 0, b"");
    c.io.flush(&mut conn);
    println!(
        "{{\"bytes\": {size}, \"seconds\": {secs:.6}, \"mib_s\": {:.3}, \"capped\": {}, \"datagrams_sent\": {}}}",
        size as f64 / secs / 1048576.0,
        size < requested,
        c.io.datagrams_sent
    );
}

fn round_trips(args: &Args) {
    let seconds = args.num("seconds", 3.0);
    let mut c = Client::new(args);
    let (scid, mut conn) = c.established();
    let payload = [0x42u8; 100];
    let mut rbuf = vec![0u8; 4096];
    let mut count: u64 = 0;
    let mut sid: u64 = 0;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        loop {
            match conn.stream_send(sid, &payload, true) {
                Ok(_) => break,
                Err(quiche::Error::StreamLimit) => c.pump(&scid, &mut conn),
                Err(e) => panic!("stream_send: {e:?}"),
            }
        }
        let mut reply = Vec::with_capacity(100);
        loop {
            if read_reply(&mut conn, sid, &mut reply, &mut rbuf) {
                break;
            }
            assert!(!conn.is_closed(), "connection closed during round trips");
            c.pump(&scid, &mut conn);
        }
        assert_eq!(reply.len(), 100);
        count += 1;
        sid += 4;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = conn.close(true, 0, b"");
    c.io.flush(&mut conn);
    println!(
        "{{\"count\": {count}, \"seconds\": {secs:.6}, \"per_s\": {:.1}}}",
        count as f64 / secs
    );
}

fn handshakes(args: &Args) {
    let seconds = args.num("seconds", 3.0);
    let mut c = Client::new(args);
    let mut count: u64 = 0;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let (_scid, mut conn) = c.established();
        let _ = conn.close(true, 0, b"");
        c.io.flush(&mut conn);
        count += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"count\": {count}, \"seconds\": {secs:.6}, \"per_s\": {:.1}}}",
        count as f64 / secs
    );
}

fn idle(args: &Args) {
    let target = args.num("count", 5000.0) as usize;
    let concurrency = args.num("concurrency", 64.0) as usize;
    let limit = Duration::from_secs_f64(args.num("idle-limit", 240.0));
    let mut c = Client::new(args);
    let (warm_id, warm) = c.established();
    let mut conns: HashMap<Cid, quiche::Connection> = HashMap::new();
    conns.insert(warm_id, warm);
    println!("WARM");
    io::stdout().flush().unwrap();
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).unwrap();
    let mut pending: Vec<Cid> = Vec::new();
    let mut established = 0usize;
    let mut failed = 0usize;
    let mut reported = false;
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        if !reported {
            pending.retain(|cid| {
                let conn = &conns[cid];
                if conn.is_established() {
                    established += 1;
                    false
                } else if conn.is_closed() {
                    failed += 1;
                    false
                } else {
                    true
                }
            });
            while established + pending.len() < target && pending.len() < concurrency {
                let (cid, mut conn) = c.connect();
                c.io.flush(&mut conn);
                conns.insert(cid, conn);
                pending.push(cid);
            }
            if established >= target || start.elapsed() > limit {
                conns.retain(|_, conn| !conn.is_closed());
                println!(
                    "{{\"connected\": {established}, \"failed\": {failed}, \"seconds\": {:.3}}}",
                    start.elapsed().as_secs_f64()
                );
                io::stdout().flush().unwrap();
                reported = true;
            }
        }
        let timeout = conns.values().filter_map(|c| c.timeout()).min();
        let timeout = if reported {
            timeout
        } else {
            timeout.map(|t| t.min(Duration::from_millis(50)))
        };
        let (readable, stdin) = c.io.wait(timeout, if reported { Some(0) } else { None });
        if stdin {
            return; // EOF or a line: we are done
        }
        let mut touched: Vec<Cid> = Vec::new();
        if readable {
            while let Some((total, from, seg)) = c.io.recv(&mut buf) {
                for start in (0..total).step_by(seg) {
                    let pkt = &mut buf[start..total.min(start + seg)];
                    if let Some(cid) = dcid_of(pkt) {
                        if let Some(conn) = conns.get_mut(&cid) {
                            let _ = conn.recv(pkt, recv_info(&c.io, from));
                            touched.push(cid);
                        }
                    }
                }
            }
        }
        for (cid, conn) in conns.iter_mut() {
            if expired(conn) {
                conn.on_timeout();
                touched.push(*cid);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for cid in touched {
            if let Some(conn) = conns.get_mut(&cid) {
                c.io.flush(conn);
            }
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(role) = argv.first() else {
        eprintln!("usage: bench-native server|client [--options]");
        std::process::exit(2);
    };
    let args = Args::parse(&argv[1..]);
    match role.as_str() {
        "server" => server(&args),
        "client" => match args.get("mode", "bulk").as_str() {
            "bulk" => bulk(&args),
            "rr" => round_trips(&args),
            "hs" => handshakes(&args),
            "idle" => idle(&args),
            other => panic!("unknown mode {other}"),
        },
        other => panic!("unknown role {other}"),
    }
}
