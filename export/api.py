"""``export.to_onnx``: any PyTorch model -> one ONNX model at exactly one opset.

Every normalization in the model becomes exactly one node (:mod:`export.recognize`): the
standard op where the opset has it and the semantics match, else one ``normport`` function;
where several exact forms exist, the one the form table gives the ``target``
(:mod:`export.lowerings._choices`).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from typing import TypedDict, Unpack

import onnx
import onnx.inliner
import torch
from torch import Tensor, nn

from normport.export._bounds_format import BOUNDS_KEY
from normport.export._emit import DEFAULT_TARGET, FUNCTION_DOMAIN, TARGETS, check_target
from normport.export._finalize import finalize, name_nodes, weights_sha256
from normport.export._lower import lower
from normport.export._opset import convert
from normport.export._placeholder import LayerSpec
from normport.export._trace import Traced, trace
from normport.export.about import version
from normport.export.outputs import output_names as _output_names
from normport.models.table import NORMPORT_NORMS, TORCH_NORMS

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TARGET",
    "MAX_OPSET",
    "MIN_OPSET",
    "MODES",
    "TARGETS",
    "ExportOptions",
    "to_onnx",
    "to_onnx_opsets",
]

MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()  # 28 with onnx 1.23; onnxruntime 1.32 loads it
DEFAULT_OPSET = 23  # every layer is a standard op from here on
MODES = ("eval", "train")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Dynamic = bool | Mapping[str, Mapping[int, str]]


class ExportOptions(TypedDict, total=False):
    """The keyword options :func:`to_onnx` passes on to :func:`to_onnx_opsets` (which states
    their defaults); :func:`to_onnx` documents them."""

    dynamic: Dynamic
    dtype: torch.dtype | None
    inline: bool
    target: str
    strict: bool
    input_names: Sequence[str] | None
    output_names: Sequence[str] | None


def _check_arguments(module: nn.Module, mode: str, opset: int, dtype: torch.dtype | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"unsupported opset {opset}: normport exports opsets {MIN_OPSET} to {MAX_OPSET}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype}: expected None or one of {', '.join(map(str, DTYPES))}"
        )
    if mode == "eval":
        training = [path or "<root>" for path, m in module.named_modules() if m.training]
        if training:
            shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
            raise ValueError(
                f"mode='eval' but {len(training)} module(s) are in training mode ({shown}); "
                "call module.eval() first, or export with mode='train' (each module is then "
                "exported as its own training flag says)"
            )


def _check_train(module: nn.Module, specs: list[LayerSpec]) -> None:
    if not any(spec.update_stats for spec in specs):
        raise ValueError(
            "mode='train' but no normalization layer updates running statistics in this "
            f"forward ({len(specs)} normalization(s) found, none in training mode with "
            "track_running_stats): call .train() on the layers to train, or export with "
            "mode='eval'"
        )


# Modules that look like normalization layers by name: reported when nothing was recognised.
_NORM_LIKE = re.compile(r"(Norm|Normalization)(\d*d)?(Act\d*d?)?$")


def _unrecognized(module: nn.Module, specs: list[LayerSpec], called: frozenset[str]):
    """Normalization-like modules whose forward ran but made no normalization node."""
    found = {spec.path for spec in specs}
    missing = []
    for path, m in module.named_modules():
        norm_type = isinstance(m, TORCH_NORMS + NORMPORT_NORMS)
        if not (norm_type or _NORM_LIKE.search(type(m).__name__)) or path not in called:
            continue
        if path in found or any(f.startswith(f"{path}.") for f in found):
            continue
        missing.append(
            {
                "path": path or "<root>",
                "cls": type(m).__qualname__,
                "why": "its forward ran but no normalization was recognised in it",
                "torch_norm": norm_type,
            }
        )
    return missing


def _inputs(example_inputs: Tensor | Sequence[Tensor], dtype: torch.dtype | None) -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty sequence of tensors")
    if dtype is None:
        return inputs
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _names(module: nn.Module, inputs: tuple, outputs, input_names, output_names):
    if input_names is None:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        input_names = params[: len(inputs)] if len(params) >= len(inputs) else None
        input_names = input_names or [f"input_{i}" for i in range(len(inputs))]
    leaves = _output_names(outputs)
    if output_names is None:
        output_names = leaves
    if len(input_names) != len(inputs) or len(output_names) != len(leaves):
        raise ValueError(
            f"expected {len(inputs)} input name(s) and {len(leaves)} output name(s), got "
            f"{list(input_names)} and {list(output_names)}"
        )
    return list(input_names), list(output_names)


def _dynamic(dynamic: Dynamic, input_names: list[str]) -> dict[str, dict[int, str]]:
    if dynamic is True:
        return {name: {0: "batch"} for name in input_names}
    if dynamic is False:
        return {}
    unknown = set(dynamic) - set(input_names)
    if unknown:
        raise ValueError(f"dynamic names unknown inputs {sorted(unknown)}; inputs: {input_names}")
    return {name: dict(axes) for name, axes in dynamic.items()}


_ELEM_TYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float64: onnx.TensorProto.DOUBLE,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
}


def _elem_type(inputs: tuple, module: nn.Module) -> int:
    """The activation dtype: the first floating input's, else the parameters'."""
    floats = [t for t in inputs if t.is_floating_point()]
    floats += [p for p in module.parameters() if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    if dtype not in _ELEM_TYPES:
        raise ValueError(
            f"unsupported activation dtype {dtype}: expected one of {list(_ELEM_TYPES)}"
        )
    return _ELEM_TYPES[dtype]


def to_onnx(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    mode: str,
    opset: int = DEFAULT_OPSET,
    **options: Unpack[ExportOptions],
) -> onnx.ModelProto:
    """Export any ``module`` to ONNX at exactly ``opset``, every normalization as one node.

    Args:
        module: the model: normport layers, torch.nn norms and their subclasses, functional
            and hand-written norms (the forms :mod:`export.recognize` lists).
        example_inputs: one batch (a tensor or a tuple); its batch axis should be > 1.
        mode: ``"eval"`` (every module must be in eval: running statistics) or ``"train"``
            (each module as its own ``training`` flag says: norm layers in training use
            batch statistics and return their updated running statistics as extra outputs,
            see :mod:`export._lower`; layers in eval use running statistics; at least one
            layer must update running statistics).
        opset: 13 to 28; the file's opset_import says exactly this.
        dynamic: True (the default: axis 0 of every input is ``"batch"``), False, or
            ``{input: {axis: name}}``.
        dtype: None (the default: as the module), ``torch.float16`` or ``torch.bfloat16``
            (weights and activations; statistics computed in float32), or
            ``torch.float32``/``float64``.
        inline: inline the model-local functions (for runtimes without them; default False).
        target: which exact form each layer takes where there are several (the table with
            its measurements: :mod:`export.lowerings._choices`): ``"onnxruntime"`` (the
            default), the fastest under onnxruntime's CPU provider as measured (e.g. GroupNorm
            as ``normport.GroupNorm``, three times as fast there as GroupNormalization-21);
            ``"standard"``, the standard op wherever the opset has one.  Recorded in the
            ``target`` metadata.
        strict: raise (the default) when a torch.nn normalization layer ran but did not become
            one node (e.g. ``LocalResponseNorm``); False records it in the
            ``normport.unrecognized`` metadata instead.
        input_names, output_names: graph names (default: forward's parameter names, and
            the output structure's: ``output``, ``output_<i>``, dict keys and ModelOutput
            fields such as ``last_hidden_state``; see :mod:`export.outputs`).

    Raises:
        ValueError: bad mode, opset, dtype or target; a module in training under ``mode="eval"``;
            ``mode="train"`` with no layer updating running statistics; a layer input the
            layer rejects (e.g. one value per channel in a train export); a torch.nn norm
            left unrecognised under ``strict``; an opset the graph cannot meet
            (:class:`export.OpsetError`, naming the op).
    """
    return to_onnx_opsets(module, example_inputs, mode=mode, opsets=(opset,), **options)[opset]


def to_onnx_opsets(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    mode: str,
    opsets: Sequence[int],
    dynamic: Dynamic = True,
    dtype: torch.dtype | None = None,
    inline: bool = False,
    strict: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    target: str = DEFAULT_TARGET,
) -> dict[int, onnx.ModelProto]:
    """:func:`to_onnx` at several opsets, tracing the module once: ``{opset: model}``."""
    check_target(target)
    for opset in opsets:
        _check_arguments(module, mode, opset, dtype)
    work = copy.deepcopy(module)
    if dtype is not None:
        work = work.to(dtype)
    inputs = _inputs(example_inputs, dtype)
    with torch.no_grad():  # the layers' own checks, on a copy (a train step moves statistics)
        outputs = copy.deepcopy(work)(*inputs)
    input_names, output_names = _names(work, inputs, outputs, input_names, output_names)
    traced = trace(
        work,
        inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic=_dynamic(dynamic, input_names),
    )
    if mode == "train":
        _check_train(work, traced.specs)
    unrecognized = _unrecognized(work, traced.specs, traced.called)
    if strict and any(entry["torch_norm"] for entry in unrecognized):
        entry = next(entry for entry in unrecognized if entry["torch_norm"])
        raise ValueError(
            f"{entry['path']!r} ({entry['cls']}) is a torch.nn normalization layer that "
            "normport cannot export as one node; pass strict=False to keep torch.onnx's "
            "translation of it (it is then listed in the normport.unrecognized metadata)"
        )
    name_nodes(traced.model)
    base = {
        "normport_version": version(),
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "mode": mode,
        "dtype": str(dtype or next((p.dtype for p in work.parameters()), torch.float32)),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "weights_sha256": weights_sha256(work),
        "inline": str(inline).lower(),
        "target": target,
        "normport.unrecognized": json.dumps(unrecognized),
        BOUNDS_KEY: json.dumps(traced.dim_bounds, sort_keys=True),
    }
    elem_type = _elem_type(inputs, work)
    return {opset: _emit(traced, opset, elem_type, inline, target, base) for opset in opsets}


def _emit(
    traced: Traced,
    opset: int,
    elem_type: int,
    inline: bool,
    target: str,
    metadata: dict[str, str],
) -> onnx.ModelProto:
    model = convert(traced.model, opset)
    if model is traced.model:
        model = onnx.ModelProto()
        model.CopyFrom(traced.model)
    lowered = lower(model, opset, elem_type, target=target)
    if inline and model.functions:
        model = onnx.inliner.inline_local_functions(model)
        model.ClearField("functions")
        kept = [o for o in model.opset_import if o.domain != FUNCTION_DOMAIN]
        model.ClearField("opset_import")
        model.opset_import.extend(kept)
    layers = json.dumps([_layer_entry(spec, node) for spec, node in lowered])
    return finalize(model, {**metadata, "opset": str(opset), "normalization_layers": layers})


def _layer_entry(spec: LayerSpec, node: str) -> dict:
    """One ``normalization_layers`` metadata entry: where the norm was found and what it became."""
    entry = {
        "path": spec.path or "<root>",
        "cls": spec.cls,
        "kind": spec.kind,
        "source": spec.source,
        "statistics": "batch" if spec.batch_stats else "running",
        "updates_running_stats": spec.update_stats,
        "node": node,
    }
    if spec.cls == "SyncBatchNorm" and spec.batch_stats:
        entry["note"] = (
            "SyncBatchNorm in training exported as BatchNorm over the local batch: equal to "
            "it in one process; across processes the statistics are not synchronised"
        )
    return entry
