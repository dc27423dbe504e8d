"""``(x - mean) / (std + eps)``: its own math, one ``normport.NormalizeStdPlusEps`` node at every
opset, never a LayerNormalization with an eps nearby; lowerings of other kinds refuse it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from normport import export
from normport.export._emit import Emitter, Inputs
from normport.export._placeholder import LayerSpec
from normport.export.lowerings import lowering_for
from tests.onnx_helpers import session
from tests.recognize.harness import check_matched, check_not_matched, layers, randomize

NODE = "normport.NormalizeStdPlusEps"


class StdPlusEps(nn.Module):
    """The annotated Transformer's LayerNorm, over any ``dims``, in one of three spellings."""

    def __init__(self, form: str, dims, affine, eps: float = 1e-3):
        super().__init__()
        self.form, self.dims, self.eps = form, dims, eps
        self.a_2 = nn.Parameter(torch.ones(affine)) if affine else None
        self.b_2 = nn.Parameter(torch.zeros(affine)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        dims, eps = self.dims, self.eps
        mean = x.mean(dims, keepdim=True)
        if self.form == "std":
            std = x.std(dims, unbiased=False, keepdim=True)
        elif self.form == "sqrt_var":
            std = torch.sqrt(x.var(dims, correction=0, keepdim=True))
        else:  # root of the mean of squares
            std = ((x - mean) ** 2).mean(dims, keepdim=True) ** 0.5
        y = (x - mean) / (std + eps)
        return y if self.a_2 is None else self.a_2 * y + self.b_2


@pytest.mark.parametrize("form", ["std", "sqrt_var", "root_mean_square"])
def test_layernorm(form):
    models = check_matched(randomize(StdPlusEps(form, -1, (12,))), (2, 5, 12), "layernorm", NODE)
    for model in models.values():
        (fn,) = model.functions
        assert fn.name == NODE.split(".")[1]
        assert [n.op_type for n in fn.node].count("Sqrt") == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    """Statistics in float32 inside the function, the output in the input's dtype."""
    module = randomize(StdPlusEps("std", -1, (12,))).to(dtype)
    check_matched(module, (2, 5, 12), "layernorm", NODE, dtype=dtype)


def test_layernorm_without_affine():
    check_matched(StdPlusEps("std", -1, None).eval(), (2, 5, 12), "layernorm", NODE)


def test_batchnorm_and_sequence_batchnorm():
    check_matched(
        randomize(StdPlusEps("sqrt_var", (0, 2, 3), (1, 6, 1, 1))), (3, 6, 4, 5), "batchnorm", NODE
    )
    check_matched(randomize(StdPlusEps("std", (0, 1), (6,))), (3, 7, 6), "sequence_batchnorm", NODE)


def test_eps_matters_where_the_variance_is_small():
    """Rows of nearly equal values: ``d / (std + eps)`` and ``d / sqrt(var + eps)`` differ by
    a factor of about ``sqrt(eps) / eps`` there, so the export must carry the exact form."""
    module = randomize(StdPlusEps("std", -1, (12,), eps=1e-3))
    model = export.to_onnx(module, torch.randn(2, 5, 12), mode="eval", opset=23)
    x = 1e-4 * torch.randn(3, 5, 12)  # var ~ 1e-8 << eps (and no cancellation in x - mean)
    with torch.no_grad():
        expected = module(x).numpy()
        inside = nn.functional.layer_norm(x, (12,), module.a_2, module.b_2, eps=1e-3).numpy()
    got = session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(inside - expected).max() > 0.05  # the standard op would be far off


def test_unbiased_std_is_left_alone():
    class Unbiased(StdPlusEps):
        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            return self.a_2 * (x - mean) / (x.std(-1, keepdim=True) + self.eps) + self.b_2

    check_not_matched(randomize(Unbiased("std", -1, (12,))), (2, 5, 12))


def test_eps_outside_a_running_statistics_root_is_left_alone():
    """``(x - rm) / (sqrt(rv) + eps)``: no lowering for running statistics with eps outside."""

    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(6))
            self.register_buffer("running_var", torch.ones(6))

        def forward(self, x):
            rm, rv = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
            return (x - rm) / (torch.sqrt(rv) + 1e-3)

    models = check_not_matched(randomize(Running()), (2, 6, 3, 3))
    assert all(layers(m) == [] for m in models.values())


BASE = dict(path="blk.norm", cls="Hand", rank=3, channels=6, eps=1e-3, eps_in_root=False)


@pytest.mark.parametrize(
    "spec",
    [
        LayerSpec(kind="rmsnorm", normalized_ndim=1, normalized_shape=(6,), **BASE),
        LayerSpec(kind="groupnorm", num_groups=2, **BASE),
        LayerSpec(kind="instancenorm", **BASE),
        LayerSpec(kind="switchable", **BASE),
    ],
    ids=lambda s: s.kind,
)
def test_kinds_without_it_refuse_it(spec):
    with pytest.raises(
        ValueError, match=r"'blk.norm' \(Hand, kind '\w+'\) has eps outside the root"
    ):
        lowering_for(spec)


@pytest.mark.parametrize(
    "changes",
    [{"batch_stats": False}, {"update_stats": True, "momentum": 0.1}],
    ids=["running_statistics", "training_update"],
)
def test_batchnorm_refuses_it_with_running_statistics(changes):
    spec = dataclasses.replace(LayerSpec(kind="batchnorm", **BASE), **changes)
    em = Emitter(17, 1, taken=set())
    with pytest.raises(ValueError, match="eps outside the root is exported with batch statistics"):
        lowering_for(spec).lower(em, spec, Inputs("x", "w", "b", "rm", "rv", "n"), ["y"])
