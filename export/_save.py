"""Atomic save: a crash never leaves a partial ``model.onnx`` behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx

__all__ = ["atomic_write", "save"]


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    return atomic_write(path, model.SerializeToString())


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Temporary file in the same folder, flush + fsync, rename over ``path``.

    The folder is created if needed; on any failure the temporary file is removed and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
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
