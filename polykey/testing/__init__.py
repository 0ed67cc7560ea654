"""polykey.testing."""
