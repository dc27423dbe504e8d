"""Crash isolation for verify: onnxruntime first opens and runs each exported model in a child.

onnxruntime can kill the process that creates a session or runs a graph (a float16
``nn.MultiheadAttention`` block with a dynamic batch segfaults onnxruntime 1.32 at session
creation).  Before verify runs a subject's cells in its own process, :func:`probe` writes each
of the subject's models and its first feeds to a temporary folder and starts
``python -m runtime.verify.isolate``, which creates a session for each model (the options of
:func:`runtime.sessions.cpu_session`) and runs it once, reporting each stage on a pipe
of its own (one JSON line per event; the child's stdout goes to stderr, so nothing a library
prints corrupts the protocol).  A model whose stage kills the child (a signal, an exit status)
or overruns ``timeout`` is reported with that stage; a fresh child takes the models after it.

The child imports only onnxruntime and numpy (not torch): it starts in about half a second.
A Python exception in the child is not reported: the same call raises again in verify's own
process, where it becomes the cell's ``error``.

The child-process protocol is :mod:`runtime.isolation`'s, shared with the server's model
probe (:mod:`runtime.serve.probe`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normport.runtime.isolation import Emit, child_main, run_isolated

__all__ = ["DEFAULT_TIMEOUT_S", "Probe", "probe"]

DEFAULT_TIMEOUT_S = 300.0
_CREATE, _RUN = "creating the session", "running the graph"


@dataclass(frozen=True)
class Probe:
    """One model to open and run once: the serialized model and ``{input: array}`` feeds."""

    model: bytes
    feeds: Mapping[str, Any]  # numpy arrays


def probe(probes: Sequence[Probe], timeout: float = DEFAULT_TIMEOUT_S) -> list[str | None]:
    """One result per probe, in order: ``None`` when the child survived it, else the crash,
    ``"onnxruntime crashed (SIGSEGV) creating the session"`` or ``"... did not finish ..."``."""
    results: list[str | None] = [None] * len(probes)
    if not probes:
        return results
    with tempfile.TemporaryDirectory(prefix="normport-verify-") as tmp:
        jobs = []
        for i, p in enumerate(probes):
            model, feeds = Path(tmp, f"{i}.onnx"), Path(tmp, f"{i}.npz")
            model.write_bytes(p.model)
            _save(feeds, p.feeds)
            jobs.append(json.dumps({"model": str(model), "feeds": str(feeds)}))
        died = run_isolated(
            "normport.runtime.verify.isolate",
            jobs,
            timeout=timeout,
            on_result=lambda index, event: None,  # survived: its cells run in verify's process
            first_stage=_CREATE,
        )
    for death in died:
        if death.timed_out:
            results[death.index] = f"onnxruntime did not finish {death.stage} within {timeout:g} s"
        else:
            last = f": {death.detail[:300]}" if death.detail else ""
            how = death.how.removeprefix("signal ")
            results[death.index] = f"onnxruntime crashed ({how}) {death.stage}{last}"
    return results


def _save(path: Path, feeds: Mapping[str, Any]) -> None:
    import numpy as np

    np.savez(path, **{f"f{i}": v for i, v in enumerate(feeds.values())})
    path.with_suffix(".json").write_text(json.dumps(list(feeds)))


# -- child -----------------------------------------------------------------------------------


def _child(jobs: list[dict[str, Any]], emit: Emit) -> None:
    import numpy as np

    from normport.runtime.sessions import cpu_session

    for i, job in enumerate(jobs):
        emit(job=i, stage=_CREATE)
        try:
            sess = cpu_session(job["model"])
            emit(job=i, stage=_RUN)
            names = json.loads(Path(job["feeds"]).with_suffix(".json").read_text())
            with np.load(job["feeds"]) as arrays:
                feeds = {n: arrays[f"f{k}"] for k, n in enumerate(names)}
            sess.run(None, feeds)
        except Exception:  # raised again in verify's process, where it is the cell's error
            pass
        emit(job=i, done=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m runtime.verify.isolate FD`` (jobs on stdin, events on fd ``FD``)."""
    return child_main(argv, _child)


if __name__ == "__main__":
    sys.exit(main())
