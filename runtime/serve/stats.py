"""Triton-style per-model statistics (the ``statistics`` extension).

Counts follow Triton: ``inference_count`` counts samples (a request of batch 4 adds 4),
``execution_count`` counts onnxruntime runs; ``execution_count < inference_count`` means
requests were batched together.  ``inference_stats`` are per request (a request's
``compute_*`` is the time of the run it was part of); ``batch_stats`` are per run, keyed by
the run's batch size.  Every duration is ``{"count": n, "ns": total}``.

Updated and read on the event loop only, so no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from normport.runtime.serve.batcher import Execution, Result

__all__ = ["ModelStats"]

_PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStats:
    """Statistics of one model version."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._request = {k: _Duration() for k in ("success", "fail", "queue", *_PHASES)}
        self._batches: dict[int, dict[str, _Duration]] = {}

    def record_execution(self, execution: Execution) -> None:
        """One onnxruntime run (called by the batcher)."""
        self.execution_count += 1
        phases = self._batches.get(execution.batch_size)
        if phases is None:  # (not setdefault: that would build the dict on every run)
            phases = self._batches[execution.batch_size] = {k: _Duration() for k in _PHASES}
        phases["compute_input"].add(execution.input_ns)
        phases["compute_infer"].add(execution.infer_ns)
        phases["compute_output"].add(execution.output_ns)

    def record_success(self, result: Result, samples: int, duration_ns: int) -> None:
        """One request answered: its samples, queue and compute time, end-to-end duration."""
        self.inference_count += samples
        self.last_inference_ms = time.time_ns() // 1_000_000
        self._request["success"].add(duration_ns)
        self._request["queue"].add(result.queue_ns)
        self._request["compute_input"].add(result.execution.input_ns)
        self._request["compute_infer"].add(result.execution.infer_ns)
        self._request["compute_output"].add(result.execution.output_ns)

    def record_failure(self, duration_ns: int) -> None:
        self._request["fail"].add(duration_ns)

    def json(self) -> dict[str, Any]:
        inference = {k: d.json() for k, d in self._request.items()}
        inference["cache_hit"] = _Duration().json()
        inference["cache_miss"] = _Duration().json()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": inference,
            "batch_stats": [
                {"batch_size": size} | {k: d.json() for k, d in phases.items()}
                for size, phases in sorted(self._batches.items())
            ],
        }
