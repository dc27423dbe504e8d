"""argparse ``type=`` converters for ``python -m runtime serve``: each rejects a bad value with
a one-line message, so argparse exits with status 2 before the server does any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from normport.runtime.serve.admission import parse_bytes
from normport.runtime.serve.busypoll import MAX_WINDOW_S as MAX_BUSY_POLL_S

__all__ = [
    "busy_poll_us",
    "folder",
    "non_negative",
    "port",
    "positive",
    "seconds",
    "size",
    "writable_file",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def busy_poll_us(text: str) -> int:
    """Microseconds of busy polling, 0 to :data:`runtime.serve.busypoll.MAX_WINDOW_S`."""
    value = _int(text)
    most = round(MAX_BUSY_POLL_S * 1e6)
    if not 0 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be 0-{most} microseconds (0: never), got {value}")
    return value


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0-65535 (0: any free), got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def size(text: str) -> int:
    """A byte count such as ``8GiB`` (:func:`runtime.serve.admission.parse_bytes`)."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def folder(text: str) -> Path:
    """An existing folder (the model repository)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    if not path.exists():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a folder (no such path); export one with "
            f"`python -m export --all --out {text}`"
        )
    return path


def writable_file(text: str) -> Path:
    """A file path whose folder exists (the port file, written once serving)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file path")
    return path
