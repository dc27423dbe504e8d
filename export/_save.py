"""Atomic save: a crash never leaves a partial ``model.onnx`` behind.

Modes: the temporary file is created 0600 (``mkstemp``), so before the rename it gets what
``open()`` would give a new file, ``0666 & ~umask`` (0644 under umask 022, 0640 under 027):
a Triton container running as another user must be able to read the repository.  Created
folders get ``0777 & ~umask`` (``mkdir``'s own rule).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

__all__ = ["atomic_write", "file_mode", "save"]


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (no race)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file now: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    return atomic_write(path, model.SerializeToString())


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Temporary file in the same folder, flush + fsync, rename over ``path``.

    The folder is created if needed; the file gets :func:`file_mode` (what a plain ``open``
    would give it), not ``mkstemp``'s 0600.  On any failure the temporary file is removed and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 would hide it from others
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
