"""normport's own version, for model metadata, reports and the server's metadata.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["version"]


@functools.cache
def version() -> str:
    """The installed ``normport`` distribution's version; ``0+unknown`` in a plain checkout
    that was never installed (a PEP 440 local version, so it still sorts and parses)."""
    try:
        return metadata.version("normport")
    except metadata.PackageNotFoundError:
        return "0+unknown"
