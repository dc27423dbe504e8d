"""Placeholders: how a normport layer crosses torch.export and the ONNX exporter intact.

During export every normport layer's ``forward`` is replaced by one call to a torch custom op
(``normport::norm_eval`` or, for a training step that updates running statistics,
``normport::norm_train``).  torch.export keeps the call as a leaf, and the ONNX exporter turns
it into one node of the private domain ``normport.placeholder`` carrying the layer's tensors
and a JSON ``spec`` (kind, module path, eps, momentum, ...).  :mod:`export._lower` then
replaces each placeholder with the standard op or function for the requested opset.  No
placeholder survives into a saved model.

Inputs of both ops, in order: ``x, weight, bias, running_mean, running_var,
num_batches_tracked, mean_weight, var_weight`` (absent ones are None / empty).
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript.values import Opset
from torch import Tensor, nn

from normport.models.table import kind_of

__all__ = [
    "DOMAIN",
    "TENSOR_NAMES",
    "LayerSpec",
    "kind_of",
    "module_spec",
    "norm_op",
    "placeholders",
]

DOMAIN = "normport.placeholder"
TENSOR_NAMES = (
    "x",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "mean_weight",
    "var_weight",
)


@dataclass(frozen=True)
class LayerSpec:
    """What a lowering needs to know about one layer, beyond its tensors."""

    kind: str  # batchnorm | sequence_batchnorm | instancenorm | groupnorm | layernorm | ...
    path: str  # module path in the exported model ("" for the root)
    cls: str  # normport class name
    rank: int  # input rank
    channels: int  # C (the normalized_shape's size for layernorm / rmsnorm)
    eps: float | None
    momentum: float | None = None
    batch_stats: bool = True  # normalize with batch statistics (training, or untracked)
    update_stats: bool = False  # a training step that updates running statistics
    num_groups: int = 0
    normalized_ndim: int = 0
    normalized_shape: tuple[int, ...] = ()
    source: str = "module"  # module | functional | handwritten: how it was found
    batched: bool = True  # False: an unbatched (C, *) input (InstanceNorm accepts one)
    eps_in_root: bool = True  # False: (x - mean) / (sqrt(var) + eps), eps outside the root

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> LayerSpec:
        fields = json.loads(text)
        fields["normalized_shape"] = tuple(fields["normalized_shape"])
        return LayerSpec(**fields)


def module_spec(module: nn.Module, kind: str, path: str, x: Tensor) -> LayerSpec:
    """The spec of a layer exported at module level (its own ``forward`` not traced)."""
    common = {"kind": kind, "path": path, "cls": type(module).__name__, "rank": x.dim()}
    if kind in ("layernorm", "rmsnorm"):
        shape = module.normalized_shape
        # RMSNorm's eps=None means finfo(input dtype).eps: resolved here, where the dtype is known.
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return LayerSpec(
            **common,
            channels=int(torch.Size(shape).numel()),
            eps=eps,
            normalized_ndim=len(shape),
            normalized_shape=tuple(shape),
        )
    if kind == "groupnorm":
        return LayerSpec(
            **common, channels=module.num_channels, eps=module.eps, num_groups=module.num_groups
        )
    batch_stats = module.training or module.running_mean is None
    if kind == "instancenorm":
        common["batched"] = x.dim() != _unbatched_rank(module)
    return LayerSpec(
        **common,
        channels=module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        batch_stats=batch_stats,
        update_stats=module.training and module.track_running_stats,
    )


def _unbatched_rank(module: nn.Module) -> int:
    """The rank of an unbatched input: 2 for InstanceNorm1d's (C, L), 3 for 2d, 4 for 3d."""
    if hasattr(module, "_get_no_batch_dim"):  # torch.nn
        return module._get_no_batch_dim()
    return module._spatial_dims + 1  # normport


def _tensors(module: nn.Module, x: Tensor) -> list[Tensor | None]:
    return [x] + [getattr(module, name, None) for name in TENSOR_NAMES[1:]]


# -- torch side: custom ops ------------------------------------------------------------------


def _not_eager(*_args, **_kwargs):
    raise RuntimeError(
        "normport placeholder ops only exist while a model is traced for export; "
        "call the layer itself to run it"
    )


OptT = Tensor | None


@torch.library.custom_op("normport::norm_eval", mutates_args=())
def _norm_eval(
    x: Tensor, w: OptT, b: OptT, rm: OptT, rv: OptT, nbt: OptT, mw: OptT, vw: OptT, spec: str
) -> Tensor:
    return _not_eager()


@_norm_eval.register_fake
def _norm_eval_fake(x, w, b, rm, rv, nbt, mw, vw, spec):
    return torch.empty_like(x)


@torch.library.custom_op("normport::norm_train", mutates_args=())
def _norm_train(
    x: Tensor, w: OptT, b: OptT, rm: Tensor, rv: Tensor, nbt: Tensor, mw: OptT, vw: OptT, spec: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _not_eager()


@_norm_train.register_fake
def _norm_train_fake(x, w, b, rm, rv, nbt, mw, vw, spec):
    return torch.empty_like(x), torch.empty_like(rm), torch.empty_like(rv), torch.empty_like(nbt)


def norm_op(update_stats: bool):
    """The custom op a placeholder calls: the train op (a 4-tuple: y and the new running
    statistics) for a step that updates running statistics, else the eval op (y)."""
    return (
        torch.ops.normport.norm_train.default
        if update_stats
        else torch.ops.normport.norm_eval.default
    )


def _placeholder_forward(self: nn.Module, input: Tensor) -> Tensor:
    spec = module_spec(self, self._normport_kind, self._normport_path, input)
    tensors = _tensors(self, input)
    if spec.update_stats:
        return norm_op(True)(*tensors, spec.to_json())[0]
    return norm_op(False)(*tensors, spec.to_json())


@contextlib.contextmanager
def placeholders(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Within the block, every normport layer of ``model`` forwards through a placeholder op.

    Yields the layers by module path.  The model itself is left as it was on exit.
    """
    layers = {}
    for path, module in model.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        module._normport_kind, module._normport_path = kind, path
        module.forward = types.MethodType(_placeholder_forward, module)
        layers[path] = module
    try:
        yield layers
    finally:
        for module in layers.values():
            del module.forward, module._normport_kind, module._normport_path


# -- ONNX side: placeholder schemas and the exporter's translation table ---------------------


def _register_schemas() -> None:
    types_ = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    opt = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter("X", "T")] + [
        OpSchema.FormalParameter(
            name, "T" if name != "num_batches_tracked" else "I", param_option=opt
        )
        for name in TENSOR_NAMES[1:]
    ]
    constraints = [("T", types_, ""), ("I", ["tensor(int64)"], "")]
    attrs = [OpSchema.Attribute("spec", OpSchema.AttrType.STRING, "LayerSpec as JSON")]
    for name, outputs in (
        ("NormEval", [OpSchema.FormalParameter("Y", "T")]),
        (
            "NormTrain",
            [
                OpSchema.FormalParameter("Y", "T"),
                OpSchema.FormalParameter("running_mean", "T"),
                OpSchema.FormalParameter("running_var", "T"),
                OpSchema.FormalParameter("num_batches_tracked", "I"),
            ],
        ),
    ):
        if not onnx.defs.has(name, DOMAIN):
            onnx.defs.register_schema(
                OpSchema(
                    name,
                    DOMAIN,
                    1,
                    inputs=inputs,
                    outputs=outputs,
                    type_constraints=constraints,
                    attributes=attrs,
                )
            )


@functools.cache
def translation_table() -> dict:
    """torch.onnx's ``custom_translation_table`` for the two placeholder ops.

    The first call registers the placeholder schemas with ``onnx.defs`` (process-wide, once):
    importing this module registers nothing.
    """
    _register_schemas()
    opset = Opset(DOMAIN, 1)

    def translate_eval(x, w, b, rm, rv, nbt, mw, vw, spec: str):
        return opset.NormEval(x, w, b, rm, rv, nbt, mw, vw, spec=spec)

    def translate_train(x, w, b, rm, rv, nbt, mw, vw, spec: str):
        return opset.NormTrain(x, w, b, rm, rv, nbt, mw, vw, spec=spec)

    return {
        torch.ops.normport.norm_eval.default: translate_eval,
        torch.ops.normport.norm_train.default: translate_train,
    }
