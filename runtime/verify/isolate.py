"""Crash isolation for verify: onnxruntime first opens and runs each exported model in a child.

onnxruntime can kill the process that creates a session or runs a graph (a float16
``nn.MultiheadAttention`` block with a dynamic batch segfaults onnxruntime 1.32 at session
creation).  Before verify runs a subject's cells in its own process, :func:`probe` writes each
of the subject's models and its first feeds to a temporary folder and starts
``python -m runtime.verify.isolate``, which creates a session for each model (the options of
:func:`runtime._recalibration_feeds.session`) and runs it once, reporting each stage on a pipe
of its own (one JSON line per event; the child's stdout goes to stderr, so nothing a library
prints corrupts the protocol).  A model whose stage kills the child (a signal, an exit status)
or overruns ``timeout`` is reported with that stage; a fresh child takes the models after it.

The child imports only onnxruntime and numpy (not torch): it starts in about half a second.
A Python exception in the child is not reported: the same call raises again in verify's own
process, where it becomes the cell's ``error``.

:mod:`runtime.serve.probe` follows the same pattern for the server; its public ``probe_all``
is bound to the server's model configuration and memory calibration, so it is not reused here.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["DEFAULT_TIMEOUT_S", "Probe", "probe"]

DEFAULT_TIMEOUT_S = 300.0
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the runtime package
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
        start = 0
        while start < len(jobs):
            start = _run_child(jobs, start, timeout, results)
    return results


def _save(path: Path, feeds: Mapping[str, Any]) -> None:
    import numpy as np

    np.savez(path, **{f"f{i}": v for i, v in enumerate(feeds.values())})
    path.with_suffix(".json").write_text(json.dumps(list(feeds)))


def _reader(stream: IO[bytes], lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _tail(stream: IO[bytes], buffer: list[bytes]) -> None:
    for line in stream:
        buffer.append(line)
        del buffer[:-20]


def _run_child(jobs: list[str], start: int, timeout: float, results: list[str | None]) -> int:
    """One child over ``jobs[start:]``; returns the index to go on from (``len``: done)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.verify.isolate", str(write_fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write_fd,),
        env=env,
    )
    os.close(write_fd)
    events: queue.Queue = queue.Queue()
    stderr: list[bytes] = []
    current, stage = start, _CREATE
    with os.fdopen(read_fd, "rb") as pipe:
        reader = threading.Thread(target=_reader, args=(pipe, events), daemon=True)
        tail = threading.Thread(target=_tail, args=(proc.stderr, stderr), daemon=True)
        reader.start()
        tail.start()
        try:
            proc.stdin.write("".join(j + "\n" for j in jobs[start:]).encode())  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                proc.kill()
                proc.wait()
                results[current] = f"onnxruntime did not finish {stage} within {timeout:g} s"
                return current + 1
            if line is None:
                break
            event = json.loads(line)
            index = start + event["job"]
            if index != current:
                deadline = time.monotonic() + timeout
            current, stage = index, event["stage"]
        code = proc.wait()
        reader.join(timeout=5)
        tail.join(timeout=5)
    if stage == "done":  # the child survived every model it reported on
        return len(jobs) if code == 0 else current + 1
    how = signal.Signals(-code).name if code < 0 else f"exit status {code}"
    lines = b"".join(stderr).decode("utf-8", "replace").strip().splitlines()
    last = f": {lines[-1][:300]}" if lines and code > 0 else ""
    results[current] = f"onnxruntime crashed ({how}) {stage}{last}"
    return current + 1


# -- child -----------------------------------------------------------------------------------


def _child(out: IO[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    def emit(job: int, stage: str) -> None:
        out.write(json.dumps({"job": job, "stage": stage}) + "\n")
        out.flush()

    for i, line in enumerate(line for line in sys.stdin if line.strip()):
        job = json.loads(line)
        emit(i, _CREATE)
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            sess = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
            emit(i, _RUN)
            names = json.loads(Path(job["feeds"]).with_suffix(".json").read_text())
            with np.load(job["feeds"]) as arrays:
                feeds = {n: arrays[f"f{k}"] for k, n in enumerate(names)}
            sess.run(None, feeds)
        except Exception:  # raised again in verify's process, where it is the cell's error
            pass
        emit(i, "done")


def main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m runtime.verify.isolate FD`` (jobs on stdin, events on fd ``FD``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = os.fdopen(int(args[0]), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the events
    _child(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
