"""Crash-isolated model loading: every model is first loaded and run in a child process.

onnxruntime can crash the process that creates a session (a float16 ``nn.MultiheadAttention``
block with a dynamic batch segfaults onnxruntime 1.32) or hang in it.  Before the server loads
anything, :func:`probe_all` starts ``python -m runtime.serve.probe`` and hands it every model
version; the child creates each session exactly as the server will (:class:`Session`, same
options and config checks), measures its memory (:func:`runtime.serve.calibrate.calibrate`)
and reports back, one JSON line per event, on a pipe of its own (its stdout is redirected to
stderr, so nothing a library prints can corrupt the protocol).

The parent gives each model ``timeout`` seconds from the moment the child starts it.  A model
whose probe kills the child (a signal, an exit status) or overruns is a :class:`ProbeFailed`
with that reason; a fresh child takes the models after it.  One child serves every model that
behaves, so a repository pays one interpreter start, not one per model.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["DEFAULT_TIMEOUT_S", "Job", "ProbeFailed", "Probed", "probe_all"]

DEFAULT_TIMEOUT_S = 120.0
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the runtime package
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Job:
    """One model version to probe."""

    path: str
    config: dict[str, Any]
    version: str
    threads: int = 0
    providers: tuple[str, ...] | None = None

    def json(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "config": self.config,
                "version": self.version,
                "threads": self.threads,
                "providers": None if self.providers is None else list(self.providers),
            }
        )


@dataclass(frozen=True)
class Probed:
    """A model version that loaded and ran in the child: its providers and memory profile."""

    providers: tuple[str, ...]
    profile: Any  # runtime.serve.memory.MemoryProfile (imported lazily: numpy)


class ProbeFailed(Exception):
    """The model failed in the child; ``str(e)`` is the reason, ready for the index."""


# -- parent ----------------------------------------------------------------------------------


def probe_all(
    jobs: Sequence[Job], timeout: float = DEFAULT_TIMEOUT_S, workers: int | None = None
) -> list[Probed | ProbeFailed]:
    """Probe every job; one result per job, in order (see the module docstring).  ``workers``
    children run side by side (default: one per CPU, at most 4), each over its share."""
    workers = workers or min(os.cpu_count() or 1, 4)
    results: list[Probed | ProbeFailed | None] = [None] * len(jobs)
    shares = [list(range(i, len(jobs), workers)) for i in range(min(workers, len(jobs)))]
    with ThreadPoolExecutor(max(len(shares), 1), thread_name_prefix="probe") as pool:
        found = pool.map(lambda share: _probe_share(jobs, share, timeout), shares)
        for share, results_of_share in zip(shares, found, strict=True):
            for index, result in zip(share, results_of_share, strict=True):
                results[index] = result
    return [r if r is not None else ProbeFailed("the probe gave no result") for r in results]


def _probe_share(
    jobs: Sequence[Job], share: list[int], timeout: float
) -> list[Probed | ProbeFailed | None]:
    mine = [jobs[i] for i in share]
    results: list[Probed | ProbeFailed | None] = [None] * len(mine)
    start = 0
    while start < len(mine):
        start = _run_child(mine, start, timeout, results)
    return results


def _reader(stream: IO[bytes], lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _tail(stream: IO[bytes], buffer: list[bytes]) -> None:
    for line in stream:
        buffer.append(line)
        if len(buffer) > 50:
            del buffer[:-50]


def _run_child(
    jobs: Sequence[Job], start: int, timeout: float, results: list[Probed | ProbeFailed | None]
) -> int:
    """Run one child over ``jobs[start:]``; returns the index to restart from (len: done)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve.probe", str(write_fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write_fd,),
        env=env,
    )
    os.close(write_fd)
    events: queue.Queue = queue.Queue()
    stderr: list[bytes] = []
    with os.fdopen(read_fd, "rb") as pipe:
        threads = [
            threading.Thread(target=_reader, args=(pipe, events), daemon=True),
            threading.Thread(target=_tail, args=(proc.stderr, stderr), daemon=True),
        ]
        for t in threads:
            t.start()
        assert proc.stdin is not None
        try:
            proc.stdin.write("".join(job.json() + "\n" for job in jobs[start:]).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        current, stage = start, "starting"
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                proc.kill()
                proc.wait()
                results[current] = ProbeFailed(
                    f"the model did not load within {timeout:g} s in the probe process "
                    f"(hung while {stage}); it is not loaded in the server"
                )
                return current + 1
            if line is None:
                break
            event = json.loads(line)
            index = start + event["job"]
            if "stage" in event:
                if index != current:
                    deadline = time.monotonic() + timeout
                current, stage = index, event["stage"]
            elif "error" in event:
                results[index] = ProbeFailed(event["error"])
            else:
                from runtime.serve.memory import Curve, MemoryProfile

                profile = event["profile"]
                results[index] = Probed(
                    tuple(event["providers"]),
                    MemoryProfile(
                        Curve.from_json(profile["work"]),
                        Curve.from_json(profile["output"]),
                        profile["resident"],
                        tuple(tuple(p) for p in profile["points"]),
                    ),
                )
        code = proc.wait()
        for t in threads:
            t.join(timeout=5)
    if results[current] is None and code != 0:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        detail = b"".join(stderr).decode("utf-8", "replace").strip().splitlines()
        last = f": {detail[-1][:_STDERR_TAIL]}" if detail and code > 0 else ""
        results[current] = ProbeFailed(
            f"onnxruntime crashed the probe process ({how}) while {stage}{last}; "
            "the model is not loaded in the server"
        )
        return current + 1
    return len(jobs)


# -- child -----------------------------------------------------------------------------------


def _child(out: IO[str]) -> None:
    from runtime.serve.calibrate import calibrate, rss
    from runtime.serve.session import Session
    from runtime.serve.spec import ModelSpec

    def emit(**event: Any) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    for i, job in enumerate(jobs):
        emit(job=i, stage="creating the session")
        session = None
        try:
            spec = ModelSpec.from_config(job["config"], job["version"])
            before = rss()
            session = Session(job["path"], spec, threads=job["threads"], providers=job["providers"])
            resident = max(rss() - before, 0)
            providers = session.providers
            emit(job=i, stage="running it on synthetic inputs")
            profile = calibrate(session, spec, resident)
        except Exception as e:  # reported as the model's reason; the next model goes on
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            emit(job=i, error=f"{type(e).__name__}: {text}")
            continue
        finally:
            del session
            gc.collect()
        emit(job=i, providers=providers, profile=profile.json())


def main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m runtime.serve.probe FD`` (jobs on stdin, events on fd ``FD``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = os.fdopen(int(args[0]), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the events
    _child(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
