"""polykey: Polykey's peer-to-peer network stack for trio."""

from __future__ import annotations

from .errors import PolykeyError

__all__ = ["PolykeyError", "__version__"]

__version__ = "0.1.0.dev0"
