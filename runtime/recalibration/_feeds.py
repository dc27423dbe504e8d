"""Feeding a normport training graph in onnxruntime: its state, its data inputs, checked batches.

A training graph (the contract: :mod:`export.train_graph`) takes the data inputs first, then
for each stateful layer ``<path>.running_mean``, ``<path>.running_var`` and
``<path>.num_batches_tracked`` (initializers that are also inputs), and returns the data
outputs, then the same names with ``.next``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normport.export.train_graph import state_pairs

__all__ = [
    "GraphInput",
    "batch_feeds",
    "check_names",
    "data_inputs",
    "initial_state",
]


def initial_state(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The statistics the graph was exported with (the state inputs' initializer values)."""
    values = {t.name: t for t in model.graph.initializer}
    state = {}
    for name, _ in state_pairs(model):
        if name not in values:
            raise ValueError(f"state input {name!r} has no initializer (its exported value)")
        state[name] = numpy_helper.to_array(values[name])
    return state


@dataclass(frozen=True)
class GraphInput:
    """One data input of a graph: name, numpy dtype and shape (ints, or names for free dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        return f"({', '.join(str(d) for d in self.shape)}) {self.dtype}"


def data_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The graph inputs that are neither state nor initializers, in order."""
    skip = {name for name, _ in state_pairs(model)} | {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in skip:
            continue
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        found.append(GraphInput(value.name, dtype, dims))
    return found


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"  # ml_dtypes' bfloat16


def _first_bad(array: np.ndarray) -> str:
    bad = ~np.isfinite(array.astype(np.float64))
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    more = int(bad.sum()) - 1
    return f"{array[index]} at index {index}" + (f" (and {more} more)" if more else "")


def _convert(value, spec: GraphInput, where: str) -> np.ndarray:
    """Check one array against a graph input; cast floating data to the input's float type.

    Any float type is accepted for a float input (float64 -> float32 rounds, float32 ->
    float16 may overflow, which is refused); integers, booleans and the like are not.
    """
    array = np.asarray(value)
    floating = _is_float(spec.dtype)
    if floating and not _is_float(array.dtype):
        raise TypeError(
            f"{where}: input {spec.name!r} expects {spec.dtype} (any float type is cast), "
            f"got {array.dtype}"
        )
    if not floating and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{where}: input {spec.name!r} expects {spec.dtype}, got {array.dtype}")
    if array.ndim != len(spec.shape):
        raise ValueError(
            f"{where}: input {spec.name!r} expects rank {len(spec.shape)} {spec.describe()}, "
            f"got shape {array.shape}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise ValueError(
                f"{where}: input {spec.name!r} expects size {want} at axis {axis} "
                f"{spec.describe()}, got shape {array.shape}"
            )
    if array.size == 0:
        why = "batch size 0" if array.shape[0] == 0 else "a dimension of size 0"
        raise ValueError(
            f"{where}: input {spec.name!r} is empty, shape {array.shape} ({why}): every batch "
            "needs at least one sample"
        )
    if floating and not np.all(np.isfinite(array.astype(np.float64, copy=False))):
        raise ValueError(f"{where}: input {spec.name!r} holds non-finite data: {_first_bad(array)}")
    with np.errstate(over="ignore"):  # an overflow is refused just below, naming the value
        cast = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    if floating and not np.all(np.isfinite(cast.astype(np.float64, copy=False))):
        raise ValueError(
            f"{where}: input {spec.name!r} has values beyond {spec.dtype}'s range, which the "
            f"cast to {spec.dtype} turns into {_first_bad(cast)}"
        )
    return cast


def check_names(arrays: Mapping[str, object], names: Sequence[str], where: str) -> None:
    """Arrays named exactly after the graph inputs ``names``, else a ValueError naming both."""
    unknown = sorted(set(arrays) - set(names))
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        raise ValueError(
            f"{where}: arrays must be named after the graph inputs {list(names)}; "
            f"unknown {unknown}, missing {missing}"
        )


def batch_feeds(batch, inputs: Sequence[GraphInput], where: str) -> dict[str, np.ndarray]:
    """Check one batch against the graph's data inputs and return the feeds.

    ``batch``: an array (a single-input graph), a sequence of arrays in input order, or a
    mapping from input name to array.  Floating arrays are cast to the input's float type.

    Raises:
        ValueError: wrong names, count, rank or a fixed dimension (naming the input).
        TypeError: integers for a float input or floats for an integer input.
    """
    names = [spec.name for spec in inputs]
    if isinstance(batch, Mapping):
        check_names(batch, names, where)
        values = [batch[n] for n in names]
    elif isinstance(batch, list | tuple):
        if len(batch) != len(names):
            raise ValueError(
                f"{where}: expected {len(names)} array(s) for inputs {names}, got {len(batch)}"
            )
        values = list(batch)
    else:
        if len(names) != 1:
            raise ValueError(
                f"{where}: the graph has {len(names)} inputs {names}; pass a tuple or a "
                "name -> array mapping, not a single array"
            )
        values = [batch]
    feeds = {spec.name: _convert(v, spec, where) for spec, v in zip(inputs, values, strict=True)}
    # Only axes the exporter named "batch" must agree (export's dynamic=True and the zoo).
    sizes = {
        spec.name: feeds[spec.name].shape[0] for spec in inputs if spec.shape[:1] == ("batch",)
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: inputs disagree on the batch size: {sizes}")
    return feeds
