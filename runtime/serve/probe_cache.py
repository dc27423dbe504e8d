"""Probe results kept across server starts, so that a restart does not calibrate again.

A probe (:mod:`runtime.serve.probe`) loads a model in a child process and measures its memory
curve, which takes seconds per model.  Its result depends only on what the key hashes:

    key = sha256(every file of the model's folder (model.onnx and any external data),
                 config text, onnxruntime version, threads, providers, CPU architecture)

so a later start with the same key reuses it without a child: the same bytes loaded and ran
in the same onnxruntime before (crash isolation already proved them), and the memory curve is
that of the same graph with the same kernels.  Any change (a re-export, another onnxruntime,
another thread count) is another key, probed afresh.  Only successful probes are kept: a model
that failed is probed again at every start.

Entries are small JSON files written atomically (temp file, rename) under
``$XDG_CACHE_HOME/normport/probe`` (``~/.cache/normport/probe``) or ``--probe-cache DIR``; an
entry that cannot be read or parsed counts as absent, and a cache folder that cannot be written
only costs the next start its probes (a warning, never an error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

from normport.export import triton_config
from normport.runtime.serve.probe import Job, Probed, from_event

__all__ = ["ProbeCache", "default_folder"]

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when the entry layout or the calibration method changes
_CHUNK = 1 << 20


def default_folder() -> Path:
    """``$XDG_CACHE_HOME/normport/probe``, else ``~/.cache/normport/probe``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normport" / "probe"


class ProbeCache:
    """Probe results under ``folder``, keyed by :meth:`key`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def key(self, job: Job) -> str | None:
        """The hex sha256 of everything the probe's result depends on (module docstring);
        None when a file cannot be read (the probe then runs, and reports the real error)."""
        import onnxruntime  # lazy: the parent needs only its version

        digest = hashlib.sha256()
        folder = Path(job.path).parent  # the version folder, or Triton's model.onnx/ folder
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(f"{path.relative_to(folder)}\0".encode())
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
        except OSError as e:
            log.warning("model %s is not readable for the probe cache (%s): probing it", folder, e)
            return None
        facts = {
            "format": _FORMAT,
            "config": triton_config.to_text(job.config),
            "version": job.version,
            "onnxruntime": onnxruntime.__version__,
            "threads": job.threads,
            "providers": None if job.providers is None else list(job.providers),
            "machine": platform.machine(),
        }
        digest.update(json.dumps(facts, sort_keys=True).encode())
        return digest.hexdigest()

    def load(self, key: str) -> Probed | None:
        """The kept result of ``key``; None when absent or unreadable."""
        path = self.folder / f"{key}.json"
        try:
            event = json.loads(path.read_text(encoding="utf-8"))
            return from_event(event)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("probe cache entry %s is unreadable (%s): probing again", path, e)
            return None

    def store(self, key: str, probed: Probed) -> None:
        """Keep ``probed`` under ``key`` (atomically); a write failure is only logged."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(probed.event(), f)
                os.replace(temp, self.folder / f"{key}.json")
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as e:
            log.warning("probe cache %s is not writable (%s): the next start probes again",
                        self.folder, e)  # fmt: skip
