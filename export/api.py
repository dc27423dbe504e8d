"""``export.to_onnx``: a model with normport layers -> one ONNX model at exactly one opset."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata

import onnx
import onnx.inliner
import torch
from torch import Tensor, nn

from export._emit import FUNCTION_DOMAIN
from export._finalize import finalize, name_nodes, weights_sha256
from export._lower import lower
from export._opset import convert
from export._placeholder import kind_of
from export._trace import trace
from models.convert import TORCH_NORMS

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "MODES", "to_onnx", "to_onnx_opsets"]

MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()  # 28 with onnx 1.23; onnxruntime 1.32 loads it
DEFAULT_OPSET = 23  # every layer is a standard op from here on
MODES = ("eval", "train")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Dynamic = bool | Mapping[str, Mapping[int, str]]


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
    training = mode == "train"
    disagree = [path or "<root>" for path, m in module.named_modules() if m.training != training]
    if disagree:
        shown = ", ".join(disagree[:5]) + (" ..." if len(disagree) > 5 else "")
        raise ValueError(
            f"mode={mode!r} but {len(disagree)} module(s) are in "
            f"{'eval' if training else 'training'} mode ({shown}); call "
            f"module.{'train' if training else 'eval'}() first or pass the matching mode"
        )


def _check_strict(module: nn.Module) -> None:
    for path, m in module.named_modules():
        if kind_of(m) is None and isinstance(m, TORCH_NORMS):
            raise ValueError(
                f"{path or '<root>'!r} is {type(m).__module__}.{type(m).__qualname__}: "
                "torch.onnx would lower it its own way (primitive ops or inference-only "
                "statistics); convert it with models.convert(module, to='normport') or pass "
                "strict=False"
            )


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
    n_out = len(outputs) if isinstance(outputs, tuple | list) else 1
    if output_names is None:
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    if len(input_names) != len(inputs) or len(output_names) != n_out:
        raise ValueError(
            f"expected {len(inputs)} input name(s) and {n_out} output name(s), got "
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


def _version() -> str:
    try:
        return importlib_metadata.version("normport")
    except importlib_metadata.PackageNotFoundError:  # running from a plain checkout
        return "0+unknown"


def to_onnx(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    mode: str,
    opset: int = DEFAULT_OPSET,
    dynamic: Dynamic = True,
    dtype: torch.dtype | None = None,
    inline: bool = False,
    strict: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (with normport layers) to ONNX at exactly ``opset``.

    Args:
        module: the model; every submodule's ``training`` flag must match ``mode``.
        example_inputs: one batch (a tensor or a tuple); its batch axis should be > 1.
        mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, and the
            updated running statistics as extra outputs: see :mod:`export._lower`).
        opset: 13 to 28; the file's opset_import says exactly this.
        dynamic: True (axis 0 of every input is ``"batch"``), False, or
            ``{input: {axis: name}}``.
        dtype: None (as the module), ``torch.float16`` or ``torch.bfloat16`` (weights and
            activations; statistics computed in float32), or ``torch.float32``/``float64``.
        inline: inline the model-local functions (for runtimes without them).
        strict: raise when a torch.nn normalization layer would fall back to torch.onnx's
            own translation.
        input_names, output_names: graph names (default: forward's parameter names, and
            ``output`` / ``output_<i>``).

    Raises:
        ValueError: bad mode, opset or dtype; training flags that disagree with ``mode``; a
            layer input the layer rejects (e.g. one value per channel in a train export); a
            torch.nn norm under ``strict``; an opset the graph cannot meet
            (:class:`export.OpsetError`, naming the op).
    """
    return to_onnx_opsets(
        module,
        example_inputs,
        mode=mode,
        opsets=(opset,),
        dynamic=dynamic,
        dtype=dtype,
        inline=inline,
        strict=strict,
        input_names=input_names,
        output_names=output_names,
    )[opset]


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
) -> dict[int, onnx.ModelProto]:
    """:func:`to_onnx` at several opsets, tracing the module once: ``{opset: model}``."""
    for opset in opsets:
        _check_arguments(module, mode, opset, dtype)
    if strict:
        _check_strict(module)
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
    name_nodes(traced)
    base = {
        "normport_version": _version(),
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "mode": mode,
        "dtype": str(dtype or next((p.dtype for p in work.parameters()), torch.float32)),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "weights_sha256": weights_sha256(work),
        "inline": str(inline).lower(),
    }
    elem_type = _elem_type(inputs, work)
    return {opset: _emit(traced, opset, elem_type, inline, base) for opset in opsets}


def _emit(
    traced: onnx.ModelProto, opset: int, elem_type: int, inline: bool, metadata: dict[str, str]
) -> onnx.ModelProto:
    model = convert(traced, opset)
    if model is traced:
        model = onnx.ModelProto()
        model.CopyFrom(traced)
    specs = lower(model, opset, elem_type)
    if inline and model.functions:
        model = onnx.inliner.inline_local_functions(model)
        model.ClearField("functions")
        kept = [o for o in model.opset_import if o.domain != FUNCTION_DOMAIN]
        model.ClearField("opset_import")
        model.opset_import.extend(kept)
    layers = ",".join(f"{s.path or '<root>'}:{s.cls}" for s in specs)
    return finalize(model, {**metadata, "opset": str(opset), "normalization_layers": layers})
