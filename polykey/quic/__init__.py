"""polykey.quic."""
