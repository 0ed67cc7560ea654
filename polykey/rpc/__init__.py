"""polykey.rpc."""
