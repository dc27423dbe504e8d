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
behaves, so a repository pays one interpreter start, not one per model.  The child-process
protocol is :mod:`runtime.isolation`'s, shared with verify's crash isolation.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from normport.export import triton_config
from normport.export.triton_config import ModelConfig
from normport.runtime.isolation import Died, Emit, child_main, run_isolated
from normport.runtime.messages import first_line

__all__ = ["DEFAULT_TIMEOUT_S", "Job", "ProbeFailed", "Probed", "from_event", "probe_all"]

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Job:
    """One model version to probe."""

    path: str
    config: ModelConfig
    version: str
    threads: int = 0
    providers: tuple[str, ...] | None = None

    def json(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "config": triton_config.to_text(self.config),
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

    def event(self) -> dict[str, Any]:
        """The JSON form the child emits; :func:`from_event` reads it back."""
        return {"providers": list(self.providers), "profile": self.profile.json()}


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

    def on_result(index: int, event: dict[str, Any]) -> None:
        results[index] = ProbeFailed(event["error"]) if "error" in event else from_event(event)

    died = run_isolated(
        "normport.runtime.serve.probe",
        [job.json() for job in mine],
        timeout=timeout,
        on_result=on_result,
        first_stage="starting",
    )
    for death in died:
        results[death.index] = ProbeFailed(_death_reason(death, timeout))
    return results


def from_event(event: dict[str, Any]) -> Probed:
    """A :class:`Probed` from the child's result event (or a kept copy of it)."""
    from normport.runtime.serve.memory import MemoryProfile

    return Probed(tuple(event["providers"]), MemoryProfile.from_json(event["profile"]))


def _death_reason(death: Died, timeout: float) -> str:
    if death.timed_out:
        return (
            f"the model did not load within {timeout:g} s in the probe process "
            f"(hung while {death.stage}); it is not loaded in the server"
        )
    last = f": {death.detail}" if death.detail else ""
    return (
        f"onnxruntime crashed the probe process ({death.how}) while {death.stage}{last}; "
        "the model is not loaded in the server"
    )


# -- child -----------------------------------------------------------------------------------


def _child(jobs: list[dict[str, Any]], emit: Emit) -> None:
    from normport.runtime.serve.calibrate import calibrate, rss
    from normport.runtime.serve.session import Session
    from normport.runtime.serve.spec import ModelSpec

    for i, job in enumerate(jobs):
        emit(job=i, stage="creating the session")
        session = None
        try:
            spec = ModelSpec.from_config(triton_config.parse(job["config"]), job["version"])
            before = rss()
            session = Session(job["path"], spec, threads=job["threads"], providers=job["providers"])
            resident = max(rss() - before, 0)
            providers = session.providers
            emit(job=i, stage="running it on synthetic inputs")
            profile = calibrate(session, spec, resident)
        except Exception as e:  # reported as the model's reason; the next model goes on
            text = first_line(e, default="")
            emit(job=i, error=f"{type(e).__name__}: {text}")
            continue
        finally:
            del session
            gc.collect()
        emit(job=i, providers=providers, profile=profile.json())


def main(argv: Sequence[str] | None = None) -> int:
    """The child: ``python -m runtime.serve.probe FD`` (jobs on stdin, events on fd ``FD``)."""
    return child_main(argv, _child)


if __name__ == "__main__":
    sys.exit(main())
