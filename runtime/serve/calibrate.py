"""Measure a model's working memory: run it at batch 1 on inputs of growing size, in the probe
child process (:mod:`runtime.serve.probe`), and read the peak RSS from ``/proc/self/status``.

Inputs are synthetic and safe for any graph: floating tensors standard-normal, integers 0 (a
valid token id, index or class), BOOL false, BYTES empty strings.  Every dynamic dim takes the
same size ``s = 4, 8, 16, ...`` (capped by the model's recorded bound), which gives ``E`` from
:func:`runtime.serve.memory.sample_elements`.  Calibration stops at the first of: a run above
:data:`MEMORY_LIMIT`, a next size the curve so far predicts above ``4 * MEMORY_LIMIT``, a run
slower than :data:`RUN_LIMIT_S`, :data:`TIME_LIMIT_S` spent, the bound, or ``s = 2**16``.
Stopping on memory rather than time matters: the growth rate read from small sizes (where
constant and linear terms still dominate) under-estimates a quadratic model.

A size the graph refuses (too small for its strides, say) is skipped;
a model no size runs on cannot be given a budget and is refused at load.

The peak of one run is ``VmHWM`` after resetting it (``/proc/self/clear_refs`` 5) minus ``VmRSS``
before; the heap is trimmed before every run (:func:`runtime.serve.heap.trim`), so that a run
cannot reuse pages an earlier one left resident and look free of charge.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from normport.runtime.messages import first_line
from normport.runtime.serve.heap import trim
from normport.runtime.serve.memory import Curve, MemoryProfile, sample_elements
from normport.runtime.serve.session import Session
from normport.runtime.serve.spec import ModelSpec, TensorSpec

__all__ = ["MEMORY_LIMIT", "RUN_LIMIT_S", "TIME_LIMIT_S", "calibrate", "rss"]

MEMORY_LIMIT = 128 * 1024 * 1024
RUN_LIMIT_S = 3.0
TIME_LIMIT_S = 15.0
_MAX_SIZE = 1 << 16
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status(key: str) -> int:
    """A ``kB`` line of ``/proc/self/status``, in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def rss() -> int:
    """This process's resident set size, bytes."""
    return _status("VmRSS")


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _shape(spec: ModelSpec, t: TensorSpec, size: int) -> tuple[int, ...] | bool:
    """The graph-facing shape of ``t`` at batch 1 with every dynamic dim ``size``; False when
    ``size`` is below one of the input's bounds, True when above one."""
    per_sample = t.dims if t.reshape is None else t.reshape
    bounded = t.reshape is None
    lows = (t.min_dims if bounded else None) or (-1,) * len(per_sample)
    highs = (t.max_dims if bounded else None) or (-1,) * len(per_sample)
    shape = []
    for dim, low, high in zip(per_sample, lows, highs, strict=True):
        if dim == -1:
            if low != -1 and size < low:
                return False
            if high != -1 and size > high:
                return True
            dim = size
        shape.append(dim)
    return (1, *shape) if spec.batched else tuple(shape)


def _feed(t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dt = t.datatype
    if dt.name == "BYTES":
        return np.full(shape, "", dtype=object)
    if dt.floating and dt.name != "BF16":
        return rng.standard_normal(shape).astype(dt.numpy)
    return np.zeros(shape, dtype=dt.numpy)  # integers, BOOL, BF16 bits of +0.0


def _sizes(spec: ModelSpec) -> list[int]:
    dynamic = any(-1 in (t.dims if t.reshape is None else t.reshape) for t in spec.inputs)
    if not dynamic:
        return [1]
    sizes, s = [], 4
    while s <= _MAX_SIZE:
        sizes.append(s)
        s *= 2
    return sizes


def calibrate(session: Session, spec: ModelSpec, resident: int) -> MemoryProfile:
    """The memory profile of ``session`` (see the module docstring), whose RSS once loaded
    was ``resident`` bytes.

    Raises:
        ValueError: no synthetic input size runs (the message gives onnxruntime's error).
    """
    rng = np.random.default_rng(0)
    baseline = rss()
    started = time.monotonic()
    points: list[tuple[int, int, int]] = []
    error = ""
    warm = False
    for size in _sizes(spec):
        shapes = {t.name: _shape(spec, t, size) for t in spec.inputs}
        if any(s is True for s in shapes.values()):
            break  # over a bound: no request can be larger
        if any(s is False for s in shapes.values()):
            continue  # under a bound: no request can be this small
        sized = {name: s for name, s in shapes.items() if not isinstance(s, bool)}
        elements = sample_elements(sized.values(), spec.batched)
        if points and Curve.fit([p[:2] for p in points])(elements) > 4 * MEMORY_LIMIT:
            break
        feeds = {t.name: _feed(t, sized[t.name], rng) for t in spec.inputs}
        try:
            if not warm:  # first-run allocations (thread pools, caches) are not working memory
                session.run(feeds, shrink=True)
                warm = True
            gc.collect()
            trim()  # pages freed earlier must not look free of charge
            before = rss()
            exact = _reset_peak()
            t0 = time.monotonic()
            outputs = session.run(feeds, shrink=True)
            elapsed = time.monotonic() - t0
            peak = _status("VmHWM")
        except (Fail, InvalidArgument, RuntimeException) as e:  # onnxruntime refuses this size
            error = first_line(e)
            continue
        work = max(peak - before, 0) if exact else max(peak - baseline, 0)
        out = sum(int(a.nbytes) for a in outputs.values())
        points.append((elements, work, out))
        if work > MEMORY_LIMIT or elapsed > RUN_LIMIT_S:
            break
        if time.monotonic() - started > TIME_LIMIT_S:
            break
    if not points:
        raise ValueError(f"the model does not run on synthetic inputs of any size: {error}")
    return MemoryProfile.from_points(points, resident)
