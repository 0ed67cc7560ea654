"""Our fixes to quiche 0.29.3, applied to a copy of its crate at build time.

quiche is pinned to 0.29.3 and built from crates.io's source; ``setup_quiche``
copies that source into ``_quiche_build/vendor/quiche`` and applies the edits
below, and Cargo.toml's ``[patch.crates-io]`` builds the copy. Each edit is an
exact replacement that must match once, so a changed upstream source fails
the build loudly instead of silently skipping a fix.

Fix 1, FIN acknowledgement (quiche issue #2525, fixed upstream by the open
PR #2665): quiche considers a stream's send side complete once all *data*
up to the final size is acknowledged, ignoring whether the FIN was. When the
FIN travels in a later, zero-length STREAM frame (``send_eof`` after
``send_all``, the normal trio pattern) and that packet is lost after the data
was acknowledged, quiche collects the stream and never retransmits the FIN:
the peer hangs until the idle timeout. We track the FIN's acknowledgement and
require it for completion; a reset (which carries the final size itself)
counts as acknowledged.

Fix 2, a FIN that arrives on a duplicate (found by our lossy-relay tests; not
yet reported upstream when this was written): when the application has
already read a stream's data and the peer retransmits that data with the FIN
in one frame (quiche does, when the data's ACK and the lone FIN were both
lost), ``RecvBuf::write`` records the final size and then drops the frame as
a duplicate: the stream never becomes readable again and the application
never learns of the FIN, so the stream hangs. We keep a FIN that is news as
an empty final buffer, as quiche already does for an empty STREAM frame.

Change 3, several STREAM frames in a packet: quiche puts one STREAM frame in
a packet (``send_single``: "a single STREAM frame for the first stream that
is flushable") and coalesces them only when built for fuzzing. Small calls
on many streams are what a node does all day: 64 unary replies at once left
in 64 packets, and a unary call's FIN and the next call's request in two.
We take quiche's own fuzzing branch, unconditionally: after a STREAM frame,
the next flushable stream's frame goes in the same packet while there is
room for one.

Addition 4, not a fix: ``Connection::pk_ssl`` hands the shim the connection's
BoringSSL ``SSL``, where the shim's verify callback keeps its copy of the
peer's chain (a server's BoringSSL keeps only a hash of it after the
handshake: see ``pk_config_new``). quiche's API has no way to reach it.
"""

from __future__ import annotations

from pathlib import Path

#: (file, old, new): each ``old`` must occur exactly once.
EDITS: list[tuple[str, str, str]] = [
    (
        "src/stream/send_buf.rs",
        "    /// The error code received via STOP_SENDING.\n    error: Option<u64>,\n}",
        "    /// The error code received via STOP_SENDING.\n    error: Option<u64>,\n\n"
        "    /// polykey: whether a STREAM frame carrying the FIN was acked (or the\n"
        "    /// stream was reset, which carries the final size itself).\n"
        "    fin_acked: bool,\n}",
    ),
    (
        "src/stream/send_buf.rs",
        "        self.fin_off = Some(unsent_off);\n\n        // Drop all buffered data.",
        "        self.fin_off = Some(unsent_off);\n        self.fin_acked = true;\n\n"
        "        // Drop all buffered data.",
    ),
    (
        "src/stream/send_buf.rs",
        "    pub fn is_complete(&self) -> bool {\n"
        "        if let Some(fin_off) = self.fin_off {\n"
        "            if self.acked == (0..fin_off) {",
        "    /// polykey: records that a STREAM frame carrying the FIN was acked.\n"
        "    pub fn ack_fin(&mut self) {\n        self.fin_acked = true;\n    }\n\n"
        "    pub fn is_complete(&self) -> bool {\n"
        "        if let Some(fin_off) = self.fin_off {\n"
        "            if self.fin_acked && self.acked == (0..fin_off) {",
    ),
    (
        "src/lib.rs",
        "                    frame::Frame::StreamHeader {\n"
        "                        stream_id,\n"
        "                        offset,\n"
        "                        length,\n"
        "                        ..\n"
        "                    } => {",
        "                    frame::Frame::StreamHeader {\n"
        "                        stream_id,\n"
        "                        offset,\n"
        "                        length,\n"
        "                        fin,\n"
        "                    } => {",
    ),
    (
        "src/lib.rs",
        "                        let dropped = stream.send.ack_and_drop(offset, length);\n",
        "                        let dropped = stream.send.ack_and_drop(offset, length);\n"
        "                        if fin {\n"
        "                            stream.send.ack_fin();\n"
        "                        }\n",
    ),
    (
        "src/stream/recv_buf.rs",
        "        if buf.fin() {\n"
        "            self.fin_off = Some(buf.max_off());\n"
        "        }\n",
        "        // polykey: whether this buffer tells us the final size first.\n"
        "        let new_fin = buf.fin() && self.fin_off.is_none();\n\n"
        "        if buf.fin() {\n"
        "            self.fin_off = Some(buf.max_off());\n"
        "        }\n",
    ),
    (
        "src/stream/recv_buf.rs",
        "            if !buf.is_empty() {\n"
        "                return Ok(());\n"
        "            }\n",
        "            if !buf.is_empty() {\n"
        "                if new_fin {\n"
        "                    // polykey: the data was read already, the FIN is\n"
        "                    // news: keep it so the stream becomes readable.\n"
        "                    let mut buf = buf;\n"
        "                    let fin_buf = buf.split_off(buf.len());\n"
        "                    self.data.insert(fin_buf.max_off(), fin_buf);\n"
        "                }\n\n"
        "                return Ok(());\n"
        "            }\n",
    ),
    (
        "src/lib.rs",
        '                #[cfg(feature = "fuzzing")]\n'
        "                // Coalesce STREAM frames when fuzzing.\n"
        "                if left > frame::MAX_STREAM_OVERHEAD {\n",
        "                // polykey: coalesce STREAM frames (quiche does only when\n"
        "                // fuzzing).\n"
        "                if left > frame::MAX_STREAM_OVERHEAD {\n",
    ),
    (
        "src/tls/mod.rs",
        "    fn as_ptr(&self) -> *const SSL {\n        self.ptr\n    }\n",
        "    fn as_ptr(&self) -> *const SSL {\n        self.ptr\n    }\n\n"
        "    /// polykey: the `SSL`, for the shim's ex_data.\n"
        "    pub(crate) fn pk_ssl(&self) -> *mut c_void {\n"
        "        self.ptr as *mut c_void\n    }\n",
    ),
    (
        "src/lib.rs",
        "    pub fn peer_cert_chain(&self) -> Option<Vec<&[u8]>> {\n"
        "        self.handshake.peer_cert_chain()\n    }\n",
        "    pub fn peer_cert_chain(&self) -> Option<Vec<&[u8]>> {\n"
        "        self.handshake.peer_cert_chain()\n    }\n\n"
        "    /// polykey: the connection's BoringSSL `SSL *`, for the shim.\n"
        "    #[doc(hidden)]\n"
        "    pub fn pk_ssl(&self) -> *mut std::ffi::c_void {\n"
        "        self.handshake.pk_ssl()\n    }\n",
    ),
]


def apply(crate_dir: Path) -> None:
    """Apply every edit to the quiche source in ``crate_dir``."""
    for name, old, new in EDITS:
        path = crate_dir / name
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise RuntimeError(
                f"patch_quiche: expected one match in {name}, found {count}: {old[:60]!r}"
            )
        path.write_text(text.replace(old, new))
