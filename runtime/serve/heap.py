"""Give freed heap memory back to the operating system.

glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as large blocks are
freed) in the process's heap, so after one large request RSS can stay hundreds of MiB above
the idle baseline although nothing uses it.  :func:`trim` calls ``malloc_trim(0)``, which
returns every free page of every heap arena; it costs about a millisecond, so the service calls
it only after large runs.  On a C library without ``malloc_trim`` it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["trim"]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def trim() -> None:
    """``malloc_trim(0)`` where the C library has it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
