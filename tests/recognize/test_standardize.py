"""Hand-written ``(x - mean) / sqrt(var + eps) * w + b``: LayerNorm, batch-statistics BatchNorm
and SequenceBatchNorm, each one node, by the axes the statistics reduce."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.recognize.harness import check_matched, check_not_matched, layers, randomize


def layernorm_node(opset: int) -> str:
    return "LayerNormalization" if opset >= 17 else "normport.LayerNorm"


class Standardize(nn.Module):
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` in one of several spellings, then
    ``* w + b`` with ``w``, ``b`` shaped ``affine`` (None: no affine)."""

    def __init__(self, form: str, dims: tuple[int, ...], affine: tuple[int, ...] | None):
        super().__init__()
        self.form, self.dims = form, dims
        self.weight = nn.Parameter(torch.ones(affine)) if affine else None
        self.bias = nn.Parameter(torch.zeros(affine)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        dims, eps, f = self.dims, 1e-5, self.form
        if f == "var_mean":
            var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        else:
            mean = x.mean(dims, keepdim=True)
        if f == "var_unbiased_false":
            y = (x - mean) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        elif f == "var_correction_0":
            y = (x - mean) * torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
        elif f == "mean_of_squares":  # two separate x - mean nodes (export does no CSE)
            y = (x - mean) / ((x - mean) ** 2).mean(dims, keepdim=True).add(eps).sqrt()
        elif f == "centred_once":
            d = x - mean
            y = d * (1 / torch.sqrt((d * d).mean(dims, keepdim=True) + eps))
        elif f == "var_mean":
            y = (x - mean) * (var + eps) ** -0.5
        elif f == "positive_axes":  # mean over 2, variance over -1: the same axis
            m = x.mean(x.dim() - 1, keepdim=True)
            y = (x - m) / torch.sqrt(x.var(-1, correction=0, keepdim=True) + eps)
        elif f == "unsqueeze":  # keepdim=False, then the axis back: the same values
            m = x.mean(-1).unsqueeze(-1)
            y = (x - m) / torch.sqrt(x.var(-1, unbiased=False).unsqueeze(-1) + eps)
        else:
            raise AssertionError(f)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y


class Upcast(nn.Module):
    """A half-precision LayerNorm that computes in float32, as mixed-precision code does."""

    def __init__(self, d: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean).div(torch.sqrt(var + 1e-5)).to(x.dtype) * self.weight + self.bias


LAYERNORM_FORMS = [
    "var_unbiased_false",
    "var_correction_0",
    "mean_of_squares",
    "centred_once",
    "var_mean",
    "positive_axes",
    "unsqueeze",
]


@pytest.mark.parametrize("form", LAYERNORM_FORMS)
def test_layernorm_spellings(form):
    module = randomize(Standardize(form, (-1,), (12,)))
    models = check_matched(module, (2, 5, 12), "layernorm", layernorm_node, label=form)
    assert {a.name: a.i for a in models[17].graph.node[0].attribute}["axis"] == -1


def test_layernorm_without_affine():
    check_matched(
        Standardize("var_correction_0", (-1,), None).eval(), (2, 5, 12), "layernorm", layernorm_node
    )


def test_layernorm_weight_stored_broadcastable():
    """A (1, 1, D) weight: the placeholder gets it reshaped to the normalized shape (D,)."""
    module = randomize(Standardize("var_mean", (-1,), (1, 1, 12)))
    models = check_matched(module, (2, 5, 12), "layernorm", layernorm_node)
    model = models[17]
    scale = {t.name: list(t.dims) for t in model.graph.initializer}[model.graph.node[0].input[1]]
    assert scale == [12]


def test_layernorm_over_two_trailing_axes():
    module = randomize(Standardize("mean_of_squares", (-2, -1), (5, 12)))
    models = check_matched(module, (2, 5, 12), "layernorm", layernorm_node)
    assert {a.name: a.i for a in models[17].graph.node[0].attribute}["axis"] == -2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layernorm_computed_in_float32(dtype):
    check_matched(
        randomize(Upcast(12)).to(dtype), (2, 5, 12), "layernorm", layernorm_node, dtype=dtype
    )


@pytest.mark.parametrize(
    ("dims", "affine", "shape"),
    [((0, 2, 3), (1, 6, 1, 1), (3, 6, 4, 5)), ((0,), (6,), (4, 6)), ((0, 2), (6, 1), (3, 6, 7))],
    ids=["2d", "1d_nc", "1d_ncl"],
)
def test_batchnorm_batch_statistics(dims, affine, shape):
    module = randomize(Standardize("var_correction_0", dims, affine))
    check_matched(module, shape, "batchnorm", "normport.BatchNormBatchStats")


def test_sequence_batchnorm_batch_statistics():
    module = randomize(Standardize("mean_of_squares", (0, 1), (6,)))
    check_matched(module, (3, 7, 6), "sequence_batchnorm", "normport.BatchNormBatchStats")


class NearMiss(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.weight, self.bias = nn.Parameter(torch.ones(12)), nn.Parameter(torch.zeros(12))

    def forward(self, x: Tensor):
        f, eps = self.form, 1e-5
        if f == "mean_over_-2":
            m = x.mean(-2, keepdim=True)
            y = (x - m) / torch.sqrt(x.var(-2, unbiased=False, keepdim=True) + eps)
        elif f == "unbiased_var":
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
        elif f == "mean_and_var_over_other_axes":
            m = x.mean(-1, keepdim=True)
            y = (x - m) / torch.sqrt(x.var((-2, -1), unbiased=False, keepdim=True) + eps)
        elif f == "eps_after_rsqrt":
            m = x.mean(-1, keepdim=True)
            y = (x - m) * (torch.rsqrt(x.var(-1, unbiased=False, keepdim=True)) + eps)
        elif f == "eps_after_division":
            m = x.mean(-1, keepdim=True)
            y = (x - m) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)) + eps
        elif f == "pow_3":
            m = x.mean(-1, keepdim=True)
            y = (x - m) / (((x - m) ** 3).abs().mean(-1, keepdim=True) + eps).sqrt()
        elif f == "shared_mean":
            m = x.mean(-1, keepdim=True)
            y = (x - m) / torch.sqrt(((x - m) ** 2).mean(-1, keepdim=True) + eps)
            return y * self.weight + self.bias, m
        elif f == "shared_var":
            m = x.mean(-1, keepdim=True)
            v = x.var(-1, unbiased=False, keepdim=True)
            return ((x - m) / torch.sqrt(v + eps)) * self.weight + self.bias, v
        elif f == "mean_of_other_value":
            m = (x * 2).mean(-1, keepdim=True)
            y = (x - m) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        else:
            raise AssertionError(f)
        return y * self.weight + self.bias


@pytest.mark.parametrize(
    "form",
    [
        "mean_over_-2",
        "unbiased_var",
        "mean_and_var_over_other_axes",
        "eps_after_rsqrt",
        "eps_after_division",
        "pow_3",
        "shared_mean",
        "shared_var",
        "mean_of_other_value",
    ],
)
def test_near_misses_are_left_alone(form):
    shape = (2, 12, 12) if form == "mean_over_-2" else (2, 5, 12)
    check_not_matched(randomize(NearMiss(form)), shape, label=form)


def test_batchnorm_over_0_and_2_of_a_4d_input_is_left_alone():
    module = randomize(Standardize("var_correction_0", (0, 2), (1, 6, 1, 1)))
    check_not_matched(module, (3, 6, 4, 5))


def test_affine_of_another_module_stays_there():
    """A norm module without affine followed by a scale-and-shift module: the norm node keeps
    the norm module's path, the other module's Mul / Add stay."""

    class ScaleShift(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(12)), nn.Parameter(torch.zeros(12))

        def forward(self, x):
            return x * self.weight + self.bias

    net = randomize(nn.Sequential(Standardize("var_mean", (-1,), None), ScaleShift()))
    models = check_matched(
        net, (2, 5, 12), "layernorm", lambda opset: [layernorm_node(opset), "Mul", "Add"]
    )
    assert [(e["path"], e["cls"]) for e in layers(models[17])] == [("0", "Standardize")]


def test_affine_kept_out_when_the_normalized_value_is_also_returned():
    """``y`` is read twice: the norm is matched without ``* w + b``, which stays outside."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(12)), nn.Parameter(torch.zeros(12))

        def forward(self, x):
            m = x.mean(-1, keepdim=True)
            y = (x - m) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
            return y * self.weight + self.bias, y

    models = check_matched(
        randomize(Twice()),
        (2, 5, 12),
        "layernorm",
        lambda opset: [layernorm_node(opset), "Mul", "Add"],
    )
    assert len(layers(models[17])) == 1
