"""Trace a model with torch.export and the ONNX exporter, normport layers as placeholders."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import Tensor, nn

from export._placeholder import TRANSLATION_TABLE, placeholders

__all__ = ["BASE_OPSET", "trace"]

# torch.onnx's translations are written for opset 18; normport converts from there itself
# (torch.onnx's own conversion silently keeps 18, or fails above it: see export._opset).
BASE_OPSET = 18


def _dynamic_shapes(
    inputs: Sequence[Tensor], names: Sequence[str], dynamic: Mapping[str, Mapping[int, str]]
) -> tuple[dict[int, torch.export.Dim], ...]:
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for name, tensor in zip(names, inputs, strict=True):
        axes = {}
        for axis, symbol in sorted(dynamic.get(name, {}).items()):
            if symbol not in dims:
                dims[symbol] = torch.export.Dim(symbol, min=1, max=1 << 16)
            axes[axis % tensor.dim()] = dims[symbol]
        shapes.append(axes)
    return tuple(shapes)


def trace(
    module: nn.Module,
    inputs: Sequence[Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
) -> onnx.ModelProto:
    """The exported graph at ``BASE_OPSET`` with placeholder nodes for the norms."""
    with placeholders(module), _quiet():
        program = torch.onnx.export(
            module,
            tuple(inputs),
            dynamo=True,
            opset_version=BASE_OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=_dynamic_shapes(inputs, input_names, dynamic) if dynamic else None,
            custom_translation_table=TRANSLATION_TABLE,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warns about torchvision; keep the caller's output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
