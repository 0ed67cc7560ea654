"""polykey.keys."""
