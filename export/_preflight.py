"""``python -m export``'s checks of the repository folder, run before any model is built.

Each returns the problem as one line (the CLI prints ``error: <line>`` and exits 2), or None:

- :func:`out_problem`: ``--out`` must be a folder, or creatable in a writable folder;
- :func:`mode_problem`: a model folder that already holds an export of the other mode is never
  overwritten (a train export must not replace the eval model that is served, nor the
  reverse); an existing ``model.onnx`` that does not parse is not overwritten either.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from normport.export.repository import MODEL_NAME, VERSION

__all__ = ["existing_mode", "mode_problem", "out_problem"]

_MODE_KEY = "mode"  # metadata_props key written by export.to_onnx
# "/<name>/1/model.onnx" and mkstemp's ".model.onnx.XXXXXXXX.tmp", names up to 128 characters
_LONGEST_INSIDE = 1 + 128 + 3 + 30


def out_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the repository folder, or None."""
    if "\0" in str(out):  # exists() just says False for it
        return f"--out {str(out)!r} is not a usable path: it holds a NUL byte"
    try:
        if out.exists():
            if not out.is_dir():
                return f"--out {str(out)!r} is a file, expected a folder"
            return None if os.access(out, os.W_OK) else f"--out {str(out)!r} is not writable"
        existing = next(p for p in out.absolute().parents if p.exists())  # "/" always exists
    except (OSError, ValueError) as err:  # a name too long, a symlink loop, ...
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return f"--out {str(out)!r} is not a usable path: {why}"
    if not existing.is_dir():
        return f"--out {str(out)!r}: {str(existing)!r} is a file, expected a folder"
    if not os.access(existing, os.W_OK):
        return f"--out {str(out)!r}: cannot create it in {str(existing)!r} (not writable)"
    return _length_problem(out, existing)


def _length_problem(out: Path, existing: Path) -> str | None:
    """A folder name below ``existing`` longer than the filesystem takes (``exists()`` is only
    False for it: ``mkdir`` would fail after the export), or a path too long for the models."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX, or no such limit
        return None
    for part in out.absolute().relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            return f"--out {str(out)!r}: a folder name is longer than {name_max} bytes"
    if len(os.fsencode(out.absolute())) + _LONGEST_INSIDE > path_max:
        return f"--out {str(out)!r}: the path is too long (limit {path_max} bytes, models included)"
    return None


def existing_mode(path: Path) -> str | None:
    """The ``mode`` metadata of the ONNX file at ``path``: ``"eval"``, ``"train"``, or None
    when absent (not a normport export).

    Raises:
        ValueError: ``path`` does not parse as an ONNX model.
        OSError: it cannot be read.
    """
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ValueError(f"does not parse as an ONNX model ({type(err).__name__})") from None
    return next((p.value for p in model.metadata_props if p.key == _MODE_KEY), None)


def _a(mode: str) -> str:
    return f"an {mode}" if mode[:1] in "aeiou" else f"a {mode}"


def mode_problem(out: Path, name: str, mode: str, *, renamable: bool = False) -> str | None:
    """Why ``out/name`` must not receive a ``mode`` export, or None (absent, or same mode).

    ``renamable``: the user chose ``name`` (``--name``), so the advice offers another one.
    """
    path = out / name / VERSION / MODEL_NAME
    try:
        if not path.is_file():
            return None
        found = existing_mode(path)
    except (OSError, ValueError) as err:
        return (
            f"{str(path)!r} exists and cannot be checked before overwriting it ({err}); move it "
            "away or choose another --out"
        )
    if found is None or found == mode:
        return None
    other = f"--name {name}_train" if mode == "train" else "another --name"
    hint = f"another --out or {other}" if renamable else "another --out"
    return (
        f"{str(out / name)!r} holds {_a(found)}-mode model and this is {_a(mode)}-mode export "
        f"named {name!r}: not overwriting it; move it away or choose {hint}"
    )
