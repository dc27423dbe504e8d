"""Prometheus metrics (``GET /metrics``), one :class:`prometheus_client.CollectorRegistry` per
app so that any number of apps can live in one process (tests, benchmarks).

Labels are ``model`` and ``version`` only, and only for models found in the repository: a
name sent by a client never becomes a label value (no unbounded label cardinality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from normport.runtime.serve.batcher import Execution, Result

__all__ = ["CONTENT_TYPE", "Metrics", "ModelMetrics"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
_BATCH_BUCKETS = tuple(2**i for i in range(11))  # 1 .. 1024
_LABELS = ("model", "version")

# The per-model families, in ModelMetrics' field order: (name, help, buckets; None: a counter).
_FAMILIES: tuple[tuple[str, str, tuple[float, ...] | None], ...] = (
    ("normport_inference_requests", "Inference requests received", None),
    ("normport_inference_failures", "Inference requests that failed", None),
    ("normport_inference_samples", "Samples inferred (sum of batch sizes)", None),
    ("normport_inference_executions", "onnxruntime runs", None),
    ("normport_inference_request_duration_seconds",
     "Request time, from the handler to the response", _LATENCY_BUCKETS),
    ("normport_inference_queue_duration_seconds", "Time a request waited for its run",
     _LATENCY_BUCKETS),
    ("normport_inference_compute_duration_seconds",
     "Time of one run (batching, onnxruntime, splitting)", _LATENCY_BUCKETS),
    ("normport_inference_batch_size", "Samples per onnxruntime run", _BATCH_BUCKETS),
)  # fmt: skip


@dataclass(frozen=True)
class ModelMetrics:
    """The metric children of one model version (label lookups done once, at load), one per
    family of ``_FAMILIES``, in its order."""

    _requests: Counter
    _failures: Counter
    _samples: Counter
    _executions: Counter
    _latency: Histogram
    _queue: Histogram
    _compute: Histogram
    _batch_size: Histogram

    def record_execution(self, execution: Execution) -> None:
        self._executions.inc()
        self._batch_size.observe(execution.batch_size)
        seconds = (execution.input_ns + execution.infer_ns + execution.output_ns) / 1e9
        self._compute.observe(seconds)

    def record_success(self, result: Result, samples: int, duration_ns: int) -> None:
        self._requests.inc()
        self._samples.inc(samples)
        self._latency.observe(duration_ns / 1e9)
        self._queue.observe(result.queue_ns / 1e9)

    def record_failure(self, duration_ns: int) -> None:
        self._requests.inc()
        self._failures.inc()
        self._latency.observe(duration_ns / 1e9)


class Metrics:
    """The metric families of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._families = [
            Counter(name, doc, _LABELS, registry=r)
            if buckets is None
            else Histogram(name, doc, _LABELS, buckets=buckets, registry=r)
            for name, doc, buckets in _FAMILIES
        ]
        self._ready = Gauge(
            "normport_model_ready", "1 when the model version is loaded", _LABELS, registry=r
        )

    def model(self, name: str, version: str, *, ready: bool) -> ModelMetrics:
        """Children for a model version found in the repository."""
        labels = {"model": name, "version": version}
        self._ready.labels(**labels).set(1 if ready else 0)
        return ModelMetrics(*(cast(Any, family.labels(**labels)) for family in self._families))

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
