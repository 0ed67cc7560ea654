"""polykey.nodes."""
