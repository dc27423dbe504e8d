"""One onnxruntime ``InferenceSession`` per model version, fed and read in the internal
representation of :mod:`runtime.serve.datatypes`.

onnxruntime quirks handled here (verified with onnxruntime 1.32):

- BF16: ``InferenceSession.run`` refuses ``uint16``/``ml_dtypes`` arrays, so BF16 inputs go in
  as ``OrtValue.ortvalue_from_numpy_with_onnx_type(bits, BFLOAT16)`` through
  ``run_with_ort_values``; BF16 outputs have no ``.numpy()``, so their bits are copied out of
  ``OrtValue.data_ptr()``.
- Strings: fed as ``str`` objects (see :mod:`runtime.serve.datatypes`).
- Memory: onnxruntime's CPU arena keeps what a large run allocated, and grows by powers of
  two: one long sequence through ``seq_bn`` held 878 MiB where the run needs 150 MiB, and kept
  it afterwards (the arena shrinkage run option cannot free the region the outputs still live
  in).  Sessions run without the arena (``enable_cpu_mem_arena = False``: plain ``malloc``,
  measured within a few percent of the arena's speed on the zoo's small requests), and
  :meth:`Session.run` with ``shrink=True`` trims the heap afterwards
  (:func:`runtime.serve.heap.trim`); the service asks for it after runs estimated above
  :data:`SHRINK_ABOVE_BYTES`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from normport.runtime.serve import datatypes
from normport.runtime.serve.heap import trim
from normport.runtime.serve.spec import ModelSpec, TensorSpec

__all__ = ["SHRINK_ABOVE_BYTES", "Session", "choose_providers"]

SHRINK_ABOVE_BYTES = 64 * 1024 * 1024
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def choose_providers(available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when this onnxruntime build offers it, then CPU."""
    available = ort.get_available_providers() if available is None else available
    return [_CUDA, _CPU] if _CUDA in available else [_CPU]


class Session:
    """An onnxruntime session for ``model.onnx``, checked against the model's config.

    Args:
        path: the ``model.onnx`` file (external data resolves relative to its folder).
        spec: the config the graph must agree with (input/output names, datatypes, every dim).
        threads: intra-op threads; 0 lets onnxruntime choose.
        providers: execution providers; default :func:`choose_providers`.

    Raises:
        ValueError: the graph and the config disagree (the message names the tensor).
        onnxruntime errors: the file is not a loadable model.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        spec: ModelSpec,
        *,
        threads: int = 0,
        providers: Sequence[str] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_cpu_mem_arena = False  # see the module docstring
        options.inter_op_num_threads = 1
        # Errors go back to the client; at level 3 every bad request would also hit stderr.
        options.log_severity_level = 4
        self._session = ort.InferenceSession(
            os.fspath(path), options, providers=list(providers or choose_providers())
        )
        self.providers: list[str] = self._session.get_providers()
        # One intra-op thread: onnxruntime computes in the calling thread, so that thread's CPU
        # time is what a run costs (runtime.serve.batcher measures it so).
        self.single_threaded = threads == 1
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        self._check(spec)
        self._bf16_inputs = frozenset(t.name for t in spec.inputs if t.datatype.name == "BF16")
        self._bf16 = bool(self._bf16_inputs) or any(t.datatype.name == "BF16" for t in spec.outputs)
        if self._bf16 and any(t.datatype.name == "BYTES" for t in spec.inputs):
            # BF16 needs run_with_ort_values, and onnxruntime cannot make an OrtValue of strings.
            raise ValueError("BYTES inputs in a model with BF16 tensors are not supported")

    @property
    def device_kind(self) -> str:
        """Triton's instance kind for the provider in use: ``KIND_GPU`` or ``KIND_CPU``."""
        return "KIND_GPU" if self.providers and self.providers[0] == _CUDA else "KIND_CPU"

    def _check(self, spec: ModelSpec) -> None:
        """Names, datatypes and every dim of the config against the graph (Triton's rules).

        The graph sees ``[batch] + reshape`` (``reshape`` defaulting to ``dims``; no batch axis
        when ``max_batch_size`` is 0).  A batch axis must be dynamic in the graph; a fixed graph
        dim must be stated exactly; a symbolic or unknown one may be stated as -1 or a size.
        """
        for kind, declared, actual in (
            ("input", spec.inputs, self._session.get_inputs()),
            ("output", spec.outputs, self._session.get_outputs()),
        ):
            graph = {a.name: a for a in actual}
            config = {t.name: t for t in declared}
            if set(graph) != set(config):
                raise ValueError(
                    f"config {kind}s {sorted(config)} differ from the graph's {sorted(graph)}"
                )
            for name, t in config.items():
                found = datatypes.from_ort_type(graph[name].type)
                if found is not t.datatype:
                    raise ValueError(
                        f"{kind} {name!r}: config says {t.datatype.triton}, "
                        f"the graph has {found.triton}"
                    )
                _check_shape(f"{kind} {name!r}", t, list(graph[name].shape), spec.max_batch_size)

    def run(self, feeds: dict[str, np.ndarray], *, shrink: bool = False) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (internal representation); every output, by name.  ``shrink``: give
        the heap's free memory back to the system when the run ends.

        Called from a worker thread; onnxruntime releases the GIL while it runs.
        """
        try:
            return self._run(feeds)
        finally:
            if shrink:
                trim()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._bf16:
            values = self._session.run(self.output_names, feeds)
            return dict(zip(self.output_names, values, strict=True))
        ort_feeds = {
            name: _to_ort_value(array, bf16=name in self._bf16_inputs)
            for name, array in feeds.items()
        }
        values = self._session.run_with_ort_values(self.output_names, ort_feeds)
        return {name: _from_ort_value(v) for name, v in zip(self.output_names, values, strict=True)}


def _check_shape(
    where: str, t: TensorSpec, graph: list[int | str | None], max_batch_size: int
) -> None:
    """``graph``: onnxruntime's shape, an int per fixed dim, a str or None per symbolic one."""
    field, per_sample = ("dims", t.dims) if t.reshape is None else ("reshape", t.reshape)
    rank = len(per_sample) + (1 if max_batch_size > 0 else 0)
    if len(graph) != rank:
        raise ValueError(f"{where}: config implies rank {rank}, the graph has shape {graph}")
    if max_batch_size > 0:
        if _fixed(graph[0]):
            raise ValueError(
                f"{where}: axis 0 is fixed at {graph[0]} in the graph, but max_batch_size "
                f"{max_batch_size} needs a dynamic batch axis there"
            )
        graph = graph[1:]
    offset = rank - len(graph)  # the graph axis of per_sample[0]
    for i, (declared, actual) in enumerate(zip(per_sample, graph, strict=True)):
        if _fixed(actual) and declared != actual:
            raise ValueError(
                f"{where}: axis {i + offset} ({field}[{i}]) is {declared} in the config, "
                f"{actual} in the graph"
            )


def _fixed(dim: int | str | None) -> bool:
    # onnxruntime reports a symbolic dim as its name, an unknown one (or a -1) as None
    return isinstance(dim, int)


def _to_ort_value(array: np.ndarray, *, bf16: bool) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if bf16:  # the uint16 bits, tagged as bfloat16
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    out = np.empty(value.shape(), dtype=np.uint16)
    if out.nbytes:
        ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out
