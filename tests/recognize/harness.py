"""Shared checks of the hand-written recognition rules: structure, provenance and numbers.

A positive case exports a module at :data:`OPSETS` and asserts that the whole top-level graph
is the one expected norm node (no ReduceMean / Sqrt / Pow / Div left of the pattern), that the
``normalization_layers`` metadata says the kind and ``source="handwritten"``, and that the
numbers match the PyTorch module on a batch of another size than the example (the batch axis
is dynamic).  A near-miss asserts that nothing was recognised and the numbers still match.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from normport import export
from normport.runtime.verify._reference import reference
from tests.onnx_helpers import close, session, top_level_ops
from tests.tolerances import OUTPUT

__all__ = [
    "NORM_OPS",
    "OPSETS",
    "check_matched",
    "check_not_matched",
    "check_numbers",
    "export_opsets",
    "layers",
    "randomize",
    "run",
]

OPSETS = (13, 17, 21, 23)
NORM_OPS = ("LayerNormalization", "RMSNormalization", "BatchNormalization", "normport.")

Expected = str | Callable[[int], str] | list[str]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every parameter and buffer: weights around 1 (never 1), biases
    and means around 0 (never 0), variances in [0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point() or t.numel() <= 1:
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if "var" in leaf:
                value = 0.5 + 1.5 * torch.rand(t.shape, generator=gen, dtype=torch.float64)
            elif "weight" in leaf or leaf in ("w", "scale", "gamma", "g"):
                value = 1.0 + 0.5 * r
            else:
                value = 0.5 * r
            t.copy_(value.to(t.dtype))
    return module.eval()


def inputs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(shape, generator=gen) + 0.3).to(dtype)


def layers(model: onnx.ModelProto) -> list[dict]:
    """The ``normalization_layers`` metadata: one entry per recognised norm."""
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta["normalization_layers"])


def run(model: onnx.ModelProto, xs: list[Tensor]) -> list[np.ndarray]:
    """onnxruntime, or onnx's ReferenceEvaluator for bfloat16 (no CPU kernels in ORT)."""
    if xs[0].dtype == torch.bfloat16:
        np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)
        names = [i.name for i in model.graph.input][: len(xs)]
        feeds = {n: x.float().numpy().astype(np_type) for n, x in zip(names, xs, strict=True)}
        out = reference(model).run(None, feeds)
        return [np.asarray(o, dtype=np.float32) for o in out]
    names = [i.name for i in model.graph.input][: len(xs)]  # train: state inputs have defaults
    return session(model).run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})


def _expected(module: nn.Module, xs: list[Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*xs)
    out = out if isinstance(out, tuple) else (out,)
    return [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in out]


def check_numbers(module, models, shape, dtype=torch.float32, label="", tolerance=None):
    """Every model against ``module`` on a batch one larger than ``shape``'s."""
    xs = [inputs((shape[0] + 1, *shape[1:]), seed=7, dtype=dtype)]
    expected = _expected(module, xs)
    atol, rtol = tolerance or OUTPUT[dtype]
    for opset, model in models.items():
        got_all = run(model, xs)[: len(expected)]  # train: the running statistics follow
        for i, (got, want) in enumerate(zip(got_all, expected, strict=True)):
            close(
                np.asarray(got, np.float64),
                want.astype(np.float64),
                f"{label} opset {opset} output {i}",
                atol=atol,
                rtol=rtol,
            )


def export_opsets(module, shape, dtype=torch.float32, mode="eval", opsets=OPSETS):
    """``{opset: model}`` for an example input of ``shape``, each through the full checker."""
    example = inputs(shape, seed=1, dtype=dtype)
    models = export.to_onnx_opsets(module, example, mode=mode, opsets=opsets)
    for model in models.values():
        onnx.checker.check_model(model, full_check=True)
    return models


def check_matched(
    module: nn.Module,
    shape: tuple[int, ...],
    kind: str,
    node: Expected,
    *,
    dtype: torch.dtype = torch.float32,
    mode: str = "eval",
    label: str = "",
) -> dict[int, onnx.ModelProto]:
    """``module`` exports as exactly ``node`` (one op type, a per-opset function, or the list
    of top-level ops) of ``kind``, found in the hand-written code, with PyTorch's numbers."""
    models = export_opsets(module, shape, dtype, mode)
    for opset, model in models.items():
        want = node(opset) if callable(node) else node
        want = want if isinstance(want, list) else [want]
        assert top_level_ops(model) == want, f"{label} opset {opset}"
        (entry,) = layers(model)
        assert (entry["kind"], entry["source"]) == (kind, "handwritten"), entry
    check_numbers(module, models, shape, dtype, label)
    return models


def check_not_matched(
    module: nn.Module,
    shape: tuple[int, ...],
    *,
    dtype=torch.float32,
    label: str = "",
    tolerance: tuple[float, float] | None = None,
    opsets: tuple[int, ...] = OPSETS,
) -> dict[int, onnx.ModelProto]:
    """Nothing in ``module`` is recognised as a norm, and the export still computes it
    (within ``tolerance``, the dtype's by default)."""
    models = export_opsets(module, shape, dtype, "eval", opsets)
    for opset, model in models.items():
        assert layers(model) == [], f"{label} opset {opset}"
        ops = top_level_ops(model)
        assert not [op for op in ops if op.startswith(NORM_OPS)], f"{label} opset {opset}: {ops}"
    check_numbers(module, models, shape, dtype, label, tolerance)
    return models
