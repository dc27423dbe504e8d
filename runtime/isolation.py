"""Run work that may crash the process (onnxruntime session creation, a first run) in a child.

onnxruntime can kill the process that creates a session or runs a graph (a float16
``nn.MultiheadAttention`` block with a dynamic batch segfaults onnxruntime 1.32) or hang in
it.  :func:`run_isolated` hands a list of jobs to ``python -m <module> FD`` and follows it:

- jobs go to the child's stdin, one JSON line each;
- the child reports on a pipe of its own, fd ``FD`` (its stdout is redirected to stderr, so
  nothing a library prints can corrupt the protocol), one JSON line per event:
  ``{"job": i, "stage": "..."}`` when job ``i`` enters a stage, and any other
  ``{"job": i, ...}`` as job ``i``'s result;
- each job gets ``timeout`` seconds from its first stage event.  A job that kills the child
  (a signal, an exit status) or overruns is a :class:`Died`, and a fresh child takes the jobs
  after it, so one bad model costs one job, and the jobs that behave share one interpreter.

The child side is :func:`child_main`: it opens the pipe, reads the jobs and calls the
module's handler with an ``emit`` function.  Used by the server's model probe
(:mod:`runtime.serve.probe`) and verify's crash isolation (:mod:`runtime.verify.isolate`).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["Died", "Emit", "child_main", "run_isolated"]

_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the runtime package
_TAIL_LINES = 50

Emit = Callable[..., None]


@dataclass(frozen=True)
class Died:
    """Job ``index`` ended its child in ``stage``.

    Attributes:
        how: ``"signal SIGSEGV"``, ``"exit status 3"`` or ``"timeout"``.
        detail: the child's last stderr line for an exit status ("" otherwise).
    """

    index: int
    stage: str
    how: str
    detail: str = ""

    @property
    def timed_out(self) -> bool:
        return self.how == "timeout"


def run_isolated(
    module: str,
    jobs: Sequence[str],
    *,
    timeout: float,
    on_result: Callable[[int, dict[str, Any]], None],
    first_stage: str = "starting",
) -> list[Died]:
    """Run ``jobs`` (JSON strings) in ``python -m module`` children; see the module docstring.

    ``on_result(index, event)`` is called for every result event, in the order they arrive.
    Returns the jobs that ended a child, in order; every other job either reported a result
    or ran to the end of the child without one.
    """
    died: list[Died] = []
    start = 0
    while start < len(jobs):
        start, death = _one_child(module, jobs, start, timeout, on_result, first_stage)
        if death is not None:
            died.append(death)
    return died


def _reader(stream: IO[bytes], lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _tail(stream: IO[bytes], buffer: list[bytes]) -> None:
    for line in stream:
        buffer.append(line)
        del buffer[:-_TAIL_LINES]


def _one_child(
    module: str,
    jobs: Sequence[str],
    start: int,
    timeout: float,
    on_result: Callable[[int, dict[str, Any]], None],
    first_stage: str,
) -> tuple[int, Died | None]:
    """One child over ``jobs[start:]``: the index to go on from, and the death if any."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(write_fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write_fd,),
        env=env,
    )
    os.close(write_fd)
    events: queue.Queue = queue.Queue()
    stderr: list[bytes] = []
    current, stage, answered = start, first_stage, False
    with os.fdopen(read_fd, "rb") as pipe:
        threads = [
            threading.Thread(target=_reader, args=(pipe, events), daemon=True),
            threading.Thread(target=_tail, args=(proc.stderr, stderr), daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            proc.stdin.write("".join(job + "\n" for job in jobs[start:]).encode())  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:  # the child died before reading its jobs
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                proc.kill()
                proc.wait()
                return current + 1, Died(current, stage, "timeout")
            if line is None:
                break
            event = json.loads(line)
            index = start + event["job"]
            if "stage" in event:
                if index != current:
                    deadline = time.monotonic() + timeout
                    answered = False
                current, stage = index, event["stage"]
            else:
                answered = index == current or answered
                on_result(index, event)
        code = proc.wait()
        for t in threads:
            t.join(timeout=5)
    if code == 0:
        return len(jobs), None
    if answered:  # died after its last result: the jobs after it never started
        return current + 1, None
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    lines = b"".join(stderr).decode("utf-8", "replace").strip().splitlines()
    detail = lines[-1][:2000] if lines and code > 0 else ""
    return current + 1, Died(current, stage, how, detail)


def child_main(
    argv: Sequence[str] | None, handle: Callable[[list[dict[str, Any]], Emit], None]
) -> int:
    """The child's entry point: ``python -m <module> FD``; ``handle(jobs, emit)`` does the work,
    calling ``emit(job=i, stage=...)`` on entering each stage and ``emit(job=i, **result)``."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = os.fdopen(int(args[0]), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the events

    def emit(**event: Any) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    handle([json.loads(line) for line in sys.stdin if line.strip()], emit)
    return 0
