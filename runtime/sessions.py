"""onnxruntime session options, in one place, for every part of normport that runs a graph.

>>> session = cpu_session(model)                      # verify, recalibration, tests
>>> opts = session_options(threads=0, arena=False, log_level=4)   # the server's

Defaults: one intra-op and one inter-op thread (results reproducible run to run), all graph
optimizations, and warnings off (``log_level=3``: a training graph's initializer-backed state
inputs warn by design).  Imports onnxruntime only.
"""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort

__all__ = ["cpu_session", "session_options"]


def session_options(
    *, threads: int = 1, arena: bool = True, log_level: int = 3
) -> ort.SessionOptions:
    """``intra_op_num_threads=threads`` (0: onnxruntime's choice), ``inter_op=1``, sequential,
    ORT_ENABLE_ALL; ``arena=False`` turns the CPU memory arena off; ``log_level`` is
    onnxruntime's severity (3 errors, 4 fatal only)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = log_level
    return options


def cpu_session(
    model: onnx.ModelProto | str | os.PathLike | bytes, *, threads: int = 1
) -> ort.InferenceSession:
    """A CPU session on ``model`` (a ModelProto, a path or serialized bytes) with
    :func:`session_options`."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(
        model, session_options(threads=threads), providers=["CPUExecutionProvider"]
    )
