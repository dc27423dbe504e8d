"""Triton Inference Server model repository: ``<root>/<name>/{config.pbtxt, 1/model.onnx}``.

>>> write_model("model_repository", "cnn_bn", export.to_onnx(net, x, mode="eval"))
>>> triton_config.read("model_repository/cnn_bn").input[0].dims
[3, -1, -1]

The config is Triton's own ``ModelConfig`` message, written with protobuf's text format
(:mod:`export.triton_config` owns the schema, the layout names and normport's parameter keys).

With ``max_batch_size > 0`` (the default) axis 0 of every graph input and output must be one
symbolic batch dimension; ``dims`` leave it out and a ``dynamic_batching`` block is written,
unless the caller says a sample's outputs depend on its batch-mates (``dynamic_batching=False``
or the reason: then the reason goes into ``#`` comments and clients still send their own
batches).
``max_batch_size=0`` (no batching: e.g. training graphs, whose batch statistics must not mix
requests and whose running statistics have no batch axis) lists full shapes instead.  Symbolic
dimensions are written as ``-1``; a tensor whose listed shape would be empty is written as
``dims: [ 1 ] reshape: { shape: [ ] }`` (Triton requires non-empty ``dims``).

Shape bounds.  A graph may take only some sizes of a dynamic dim: a position table of 64 rows
takes at most 64 tokens (:mod:`export._bounds` records such bounds in the model's
``normport.dim_bounds`` metadata).  :func:`build_config` writes them as Triton ``parameters``,
which Triton ignores and the normport server enforces (a 400 naming the input, the axis, the
size and the bound, instead of onnxruntime failing inside the graph).  ``transformer_ln``,
whose ``tokens`` are ``[batch, seq_len]`` (``dims: [ -1 ]``) with ``seq_len <= 64``, gets::

    parameters {
      key: "normport.max_shape.tokens"
      value: { string_value: "[64]" }
    }

Keys: ``normport.max_shape.<input>`` (largest size of each axis) and
``normport.min_shape.<input>`` (smallest), for an input of the config, each at most once.
Value: a JSON list of ints, one per entry of that input's ``dims`` (so per sample: no batch
axis when ``max_batch_size > 0``, which bounds the batch), ``-1`` where the axis has no such
bound; bounds are inclusive, and a fixed dim's entry is ``-1`` or that dim.  Only inputs with
a bound get a key.  A hand-written config may set them too (the server checks them when it
loads the model: see :mod:`runtime.serve.spec`).  Other ``normport.*`` keys are refused
(:func:`export.triton_config.check_parameters`); every other key (Triton's own, e.g.
``execution_mode``) is kept and ignored.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, Unpack

import onnx

from normport.export import triton_config
from normport.export._bounds_format import Bounds, read_dim_bounds
from normport.export._save import atomic_write, save
from normport.export.triton_config import (
    CONFIG_NAME,
    MAX_SHAPE,
    MIN_SHAPE,
    MODEL_NAME,
    PLATFORM,
    VERSION,
    ModelConfig,
)

__all__ = [
    "BatchingOptions",
    "DEFAULT_PREFERRED_BATCH_SIZES",
    "TRITON_TYPES",
    "build_config",
    "triton_type",
    "write_model",
]

DEFAULT_PREFERRED_BATCH_SIZES = (16, 32, 64)  # those <= max_batch_size are used


class BatchingOptions(TypedDict, total=False):
    """The batching keywords :func:`write_model` passes on to :func:`build_config` (defaults
    and meaning there)."""

    max_batch_size: int
    preferred_batch_sizes: Sequence[int] | None
    max_queue_delay_microseconds: int
    dynamic_batching: bool | str


_T = onnx.TensorProto
TRITON_TYPES: dict[int, str] = {
    _T.BOOL: "TYPE_BOOL",
    _T.UINT8: "TYPE_UINT8",
    _T.UINT16: "TYPE_UINT16",
    _T.UINT32: "TYPE_UINT32",
    _T.UINT64: "TYPE_UINT64",
    _T.INT8: "TYPE_INT8",
    _T.INT16: "TYPE_INT16",
    _T.INT32: "TYPE_INT32",
    _T.INT64: "TYPE_INT64",
    _T.FLOAT16: "TYPE_FP16",
    _T.BFLOAT16: "TYPE_BF16",
    _T.FLOAT: "TYPE_FP32",
    _T.DOUBLE: "TYPE_FP64",
    _T.STRING: "TYPE_STRING",
}


def triton_type(elem_type: int, tensor: str = "?") -> str:
    """The Triton ``TYPE_*`` name of an ONNX element type; ValueError naming an unmapped one."""
    if elem_type not in TRITON_TYPES:
        onnx_name = _T.DataType.Name(elem_type) if elem_type in _T.DataType.values() else elem_type
        raise ValueError(
            f"tensor {tensor!r} has ONNX element type {onnx_name}, which has no Triton "
            f"TYPE_* (supported: {', '.join(_T.DataType.Name(t) for t in TRITON_TYPES)})"
        )
    return TRITON_TYPES[elem_type]


def _tensor(
    value: onnx.ValueInfoProto, kind: str, batch: list[str] | None
) -> triton_config.ModelInput | triton_config.ModelOutput:
    """One config tensor; ``batch`` collects the batch symbol (None: no batching)."""
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        raise ValueError(f"{kind} {value.name!r} is not a tensor of known rank")
    shape = list(ttype.shape.dim)
    if batch is not None:
        symbol = shape[0].dim_param if shape else ""
        if not symbol or (batch and symbol != batch[0]):
            axis0 = "none (a scalar)" if not shape else (symbol or shape[0].dim_value or "?")
            expected = repr(batch[0]) if batch else "a symbolic batch dimension"
            raise ValueError(
                f"{kind} {value.name!r}: axis 0 is {axis0}, expected {expected}; Triton batches "
                "every input and output along axis 0 (use max_batch_size=0 for no batching)"
            )
        if not batch:
            batch.append(symbol)  # the first tensor names the batch symbol for all others
        shape = shape[1:]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in shape]
    message = triton_config.ModelInput if kind == "input" else triton_config.ModelOutput
    tensor = message(
        name=value.name,
        data_type=triton_config.type_value(triton_type(ttype.elem_type, value.name)),
        dims=dims or [1],
    )
    if not dims:
        tensor.reshape.SetInParent()  # reshape: { shape: [ ] }: the graph's per-sample scalar
    return tensor


def _preferred(max_batch_size: int, preferred: Sequence[int] | None) -> list[int]:
    if preferred is None:
        return [s for s in DEFAULT_PREFERRED_BATCH_SIZES if s <= max_batch_size] or [max_batch_size]
    sizes = list(preferred)
    if any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= max_batch_size for s in sizes
    ):
        raise ValueError(
            f"preferred batch sizes must be ints in [1, {max_batch_size}], got {sizes}"
        )
    return sorted(set(sizes))


def build_config(
    name: str,
    model: onnx.ModelProto,
    *,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int = 100,
    dynamic_batching: bool | str = True,
) -> ModelConfig:
    """The Triton ``ModelConfig`` of ``model`` served as ``name``.

    The graph's dim bounds (``normport.dim_bounds`` metadata) become ``parameters`` (see the
    module docstring).

    ``dynamic_batching`` is the caller's decision (``python -m export`` measures it with
    :func:`export.batch_mates.measure`): True writes a ``dynamic_batching`` block when
    ``max_batch_size > 0``; False, or a reason (a string: why a sample's outputs depend on its
    batch-mates), writes none, while ``max_batch_size`` still lets a client send its own batch.
    :func:`write_model` writes the reason as ``#`` comments.

    Raises:
        ValueError: a bad name or batching option, a tensor without a Triton type or of unknown
            rank, (``max_batch_size > 0``) a tensor whose axis 0 is not the batch dimension or a
            batch dimension the graph bounds below ``[1, max_batch_size]``, or bad metadata.
    """
    if not name or name in (".", "..") or any(c in name for c in "/\\\0\n"):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")
    options = {
        "max_batch_size": max_batch_size,
        "max_queue_delay_microseconds": max_queue_delay_microseconds,
    }
    for option, n in options.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{option} must be an int >= 0, got {n!r}")
    if max_batch_size == 0 and preferred_batch_sizes:
        raise ValueError("preferred_batch_sizes needs max_batch_size > 0")
    if not isinstance(dynamic_batching, bool | str) or dynamic_batching == "":
        raise ValueError(
            f"dynamic_batching must be True, False or a non-empty reason, got {dynamic_batching!r}"
        )
    batching = dynamic_batching is True and max_batch_size > 0
    batch: list[str] | None = [] if max_batch_size > 0 else None
    graph = model.graph
    inputs = [_tensor(v, "input", batch) for v in graph.input]
    outputs = [_tensor(v, "output", batch) for v in graph.output]
    bounds = read_dim_bounds(model)
    if batch:
        _check_batch_bounds(bounds.get(batch[0], {}), batch[0], max_batch_size)
    config = ModelConfig(
        name=name,
        platform=PLATFORM,
        max_batch_size=max_batch_size,
        input=inputs,
        output=outputs,
    )
    if batching:
        config.dynamic_batching.SetInParent()  # present even when every field is a default
        config.dynamic_batching.preferred_batch_size.extend(
            _preferred(max_batch_size, preferred_batch_sizes)
        )
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    for key, value in _shape_parameters(graph.input, bounds, batched=batch is not None).items():
        config.parameters[key].string_value = value
    return config


def _check_batch_bounds(bound: dict[str, int], symbol: str, max_batch_size: int) -> None:
    """Triton sends batches of 1 to ``max_batch_size``: the graph must take all of them."""
    if bound.get("max", max_batch_size) < max_batch_size:
        raise ValueError(
            f"the graph takes at most {bound['max']} on its batch dim {symbol!r}: use "
            f"max_batch_size <= {bound['max']} (got {max_batch_size})"
        )
    if bound.get("min", 1) > 1:
        raise ValueError(
            f"the graph takes at least {bound['min']} on its batch dim {symbol!r}, but a batch "
            "may hold one request: use max_batch_size=0"
        )


def _shape_parameters(
    inputs: Sequence[onnx.ValueInfoProto], bounds: Bounds, *, batched: bool
) -> dict[str, str]:
    """``normport.{min,max}_shape.<input>`` of every input with a bounded per-sample dim.

    A bound on a dim that no input keeps symbolic needs no parameter: ``dims`` fix that dim.
    """
    parameters: dict[str, str] = {}
    for value in inputs:
        dims = list(value.type.tensor_type.shape.dim)[1 if batched else 0 :]
        for prefix, end in ((MAX_SHAPE, "max"), (MIN_SHAPE, "min")):
            row = [bounds.get(d.dim_param, {}).get(end, -1) if d.dim_param else -1 for d in dims]
            if any(b != -1 for b in row):
                parameters[prefix + value.name] = json.dumps(row)
    return parameters


def _wrap(text: str, width: int = 96) -> list[str]:
    """``text``'s lines, each wrapped at spaces to ``width`` (a long word stays whole)."""
    return [
        part
        for line in text.splitlines()
        for part in textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False)
        or [""]
    ]


def write_model(
    root: str | os.PathLike,
    name: str,
    model: onnx.ModelProto,
    **options: Unpack[BatchingOptions],
) -> Path:
    """Write ``root/name/1/model.onnx`` and ``root/name/config.pbtxt`` (both atomically).

    ``options``: :func:`build_config`'s batching keywords (``max_batch_size=64``,
    ``preferred_batch_sizes=None``, ``max_queue_delay_microseconds=100``,
    ``dynamic_batching=True``).  ``preferred_batch_sizes=None`` uses those of
    :data:`DEFAULT_PREFERRED_BATCH_SIZES` that fit (or ``[max_batch_size]``); ``()`` leaves the
    field out.  ``dynamic_batching``: see :func:`build_config`; a reason is written into
    ``config.pbtxt`` as ``#`` comments.  Nothing is written when the config is invalid (see
    :func:`build_config` for the errors).  Files get the umask's mode (0644 under umask 022),
    created folders 0777 less the umask.  Returns ``root/name``.
    """
    config = build_config(name, model, **options)
    reason = options.get("dynamic_batching")
    comment = None
    if isinstance(reason, str) and config.max_batch_size > 0:
        comment = f"No dynamic_batching: {reason}"
    folder = Path(root) / name
    save(model, folder / VERSION / MODEL_NAME)  # the model first: a config never dangles
    text = triton_config.to_text(config, "\n".join(_wrap(comment)) if comment else None)
    atomic_write(folder / CONFIG_NAME, text.encode("utf-8"))
    return folder
