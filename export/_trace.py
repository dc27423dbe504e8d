"""Trace a model with torch.export, make every normalization one placeholder, emit ONNX.

1. Layers with a known ``forward`` (:func:`models.table.kind_of`) forward through a
   placeholder op while ``torch.export`` traces (:func:`export._placeholder.placeholders`).
2. The other normalizations are found on the traced ATen graph (:mod:`export.recognize`).
3. torch.onnx translates the rewritten program at ``BASE_OPSET``; placeholders become nodes of
   the ``normport.placeholder`` domain that :mod:`export._lower` replaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import Tensor, nn

from normport.export._bounds import DIM_MAX, Bounds, dim_bounds
from normport.export._placeholder import LayerSpec, placeholders, translation_table
from normport.export.recognize import recognize

__all__ = ["BASE_OPSET", "Traced", "trace"]

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
                dims[symbol] = torch.export.Dim(symbol, min=1, max=DIM_MAX)
            axes[axis % tensor.dim()] = dims[symbol]
        shapes.append(axes)
    return tuple(shapes)


def _export(module: nn.Module, inputs: tuple, shapes) -> torch.export.ExportedProgram:
    """``torch.export`` as torch.onnx calls it: sizes 0 and 1 are not special-cased
    (``backed_size_oblivious``), guards on dynamic dims become runtime asserts where they can
    (``seq_len <= 64`` from a position table of 64 rows: torch.onnx drops them,
    :mod:`export._bounds` keeps them as bounds), and a dim range the trace narrows (a stride-2
    conv guarding ``size // 2 != 1``) is refined from export's own suggested fixes, a few
    rounds at most."""
    error: Exception | None = None
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        for _round in range(_REFINE_ROUNDS):
            try:
                return torch.export.export(
                    module,
                    inputs,
                    dynamic_shapes=shapes,
                    strict=False,
                    prefer_deferred_runtime_asserts_over_guards=True,
                )
            except torch._dynamo.exc.UserError as err:
                if shapes is None:
                    raise
                error = err
                try:
                    shapes = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(
                        err.msg, shapes
                    )
                except Exception:
                    raise err from None
    raise error


_REFINE_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Traced:
    """The ONNX graph at ``BASE_OPSET`` with placeholders, the spec of each placeholder, and
    the bounds the graph puts on its dynamic dims (:func:`export._bounds.dim_bounds`)."""

    model: onnx.ModelProto
    specs: list[LayerSpec]
    called: frozenset[str]  # paths of the modules whose forward ran while tracing
    dim_bounds: Bounds = dataclasses.field(default_factory=dict)


def _called(program: torch.export.ExportedProgram) -> frozenset[str]:
    paths = set()
    for node in program.graph.nodes:
        for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(path)
    return frozenset(paths)


def trace(
    module: nn.Module,
    inputs: Sequence[Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
) -> Traced:
    """Trace ``module`` once; every normalization in it is one placeholder node."""
    shapes = _dynamic_shapes(inputs, input_names, dynamic) if dynamic else None
    with placeholders(module), _quiet():
        program = _export(module, tuple(inputs), shapes)
    specs = recognize(program)
    called = _called(program)
    bounds = dim_bounds(program, input_names, dynamic) if dynamic else {}
    with _quiet():
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=BASE_OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            custom_translation_table=translation_table(),
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model_proto
    _name_dims(model, dynamic)
    return Traced(model, specs, called, bounds)


def _name_dims(model: onnx.ModelProto, dynamic: Mapping[str, Mapping[int, str]]) -> None:
    """Give the symbolic dims the caller's names (``batch``, ``seq_len``) instead of the
    tracer's (``s31``), wherever the same symbol appears in the graph's signature."""
    rename: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, symbol in dynamic.get(value.name, {}).items():
            param = dims[axis % len(dims)].dim_param
            if param:
                rename.setdefault(param, symbol)
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


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
