"""ATen's fused kernels (:mod:`models._fused`) against normport's hand-written reference.

LayerNorm and GroupNorm run ATen's CPU kernels for float32 / float64, BatchNorm's eval its eval
kernel; everything else stays on :func:`models._functional.standardize`.  Pinned here:

* which path runs for which input (the rows where the fused path must *not* run included);
* the fused path equals the plain formula (``standardize(..., reference=True)``,
  ``affine_from_stats``) evaluated in float64: outputs, input and parameter gradients, second
  derivatives, with random non-trivial parameters (never gamma=1, beta=0);
* the exactness that decided where ATen may run: a constant input gives exactly ``beta``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from normport import models
from normport.models._functional import affine_from_stats, standardize
from normport.models._fused import FOLD_MAX_MEAN_RSTD, FUSED_DTYPES
from normport.models.randomize import randomize
from tests.cases import make_input
from tests.tolerances import GRAD, OUTPUT

FUSED = {"NativeLayerNormBackward0", "_GroupNormBackward", "NativeBatchNormBackward0"}


class _Subclass(Tensor):
    """A tensor subclass with ``__torch_function__``: it must keep seeing the primitive ops."""


def _cast(x: Tensor, how: str) -> Tensor:
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if how == "subclass":
        return x.as_subclass(_Subclass)
    if how == "either":  # (N, C, 1, 1) with channels-last strides: contiguous both ways
        c = x.shape[1]
        return torch.empty_strided(x.shape, (c, 1, c, c), dtype=x.dtype).copy_(x)
    return x


def _row(name, factory, shape, fused, dtype="float32", x_dtype=None, layout="", eval_mode=False):
    """One input and whether it takes the fused path; ``x_dtype`` defaults to ``dtype``."""
    return pytest.param(factory, shape, dtype, x_dtype or dtype, layout, eval_mode, fused, id=name)


LN, GN, BN1d, BN2d = models.LayerNorm, models.GroupNorm, models.BatchNorm1d, models.BatchNorm2d
SBN, CL3D = models.SequenceBatchNorm, "channels_last_3d"
PATHS = [
    _row("LayerNorm-f32", lambda: LN(8), (4, 5, 8), True),
    _row("LayerNorm-f64-two_dims", lambda: LN((3, 8)), (2, 3, 8), True, "float64"),
    _row("LayerNorm-unbatched", lambda: LN(8), (8,), True),
    _row("LayerNorm-no_affine", lambda: LN(8, elementwise_affine=False), (3, 8), True),
    _row("LayerNorm-bf16", lambda: LN(8), (4, 8), False, "bfloat16"),
    _row("LayerNorm-f16", lambda: LN(8), (4, 8), False, "float16"),
    _row("LayerNorm-mixed_dtypes", lambda: LN(8), (4, 8), False, x_dtype="float64"),
    _row("LayerNorm-subclass", lambda: LN(8), (4, 8), False, layout="subclass"),
    _row("RMSNorm-f32", lambda: models.RMSNorm(8), (4, 8), False),
    _row("GroupNorm-f32", lambda: GN(3, 6), (2, 6, 4, 5), True),
    _row("GroupNorm-f64-2d", lambda: GN(2, 6), (5, 6), True, "float64"),
    _row("GroupNorm-no_affine-3d", lambda: GN(2, 4, affine=False), (3, 4, 7), True),
    _row("GroupNorm-channels_last", lambda: GN(3, 6), (2, 6, 4, 5), False, layout="channels_last"),
    _row("GroupNorm-channels_last_3d", lambda: GN(3, 6), (2, 6, 2, 3, 2), False, layout=CL3D),
    _row("GroupNorm-1x1", lambda: GN(3, 6), (4, 6, 1, 1), False),
    _row(
        "GroupNorm-1x1_channels_last_strides",
        lambda: GN(3, 6),
        (4, 6, 1, 1),
        False,
        layout="either",
    ),
    _row("GroupNorm-bf16", lambda: GN(3, 6), (2, 6, 4), False, "bfloat16"),
    _row("GroupNorm-subclass", lambda: GN(3, 6), (2, 6, 4), False, layout="subclass"),
    _row("BatchNorm2d-eval-f32", lambda: BN2d(6), (3, 6, 4, 5), True, eval_mode=True),
    _row("BatchNorm1d-eval-f64", lambda: BN1d(6), (3, 6), True, "float64", eval_mode=True),
    _row("BatchNorm2d-eval-bf16", lambda: BN2d(6), (3, 6, 4, 5), False, "bfloat16", eval_mode=True),
    _row("BatchNorm2d-train", lambda: BN2d(6), (3, 6, 4, 5), False),
    _row("SequenceBatchNorm-eval", lambda: SBN(6), (3, 4, 6), False, eval_mode=True),
]


@pytest.mark.parametrize(
    ("factory", "shape", "dtype", "x_dtype", "layout", "eval_mode", "fused"), PATHS
)
def test_which_path_runs(factory, shape, dtype, x_dtype, layout, eval_mode, fused):
    layer = randomize(factory(), torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    layer.train(not eval_mode)
    x = make_input(shape, torch.Generator().manual_seed(1), getattr(torch, x_dtype))
    x = _cast(x, layout).requires_grad_(True)
    y = layer(x)
    assert (type(y.grad_fn).__name__ in FUSED) == fused, type(y.grad_fn).__name__
    with torch.no_grad():  # no autograd Function in between, the same numbers
        assert torch.equal(layer(x), y.detach())


# -- the fused path against the plain formula --------------------------------------------------


def _reference(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's math written plainly (differentiable to every order), in x's dtype."""
    if isinstance(layer, models.LayerNorm):
        inner = layer.weight.numel() if layer.weight is not None else x.shape[-1]
        view = (1, x.numel() // inner, inner)
        return standardize(x, view, layer.weight, layer.bias, layer.eps, reference=True)[0]
    if isinstance(layer, models.GroupNorm):
        n, c, g = x.shape[0], x.shape[1], layer.num_groups
        shape = (c,) + (1,) * (x.dim() - 2)
        w = None if layer.weight is None else layer.weight.view(shape)
        b = None if layer.bias is None else layer.bias.view(shape)
        return standardize(x, (1, n * g, x.numel() // (n * g)), w, b, layer.eps, reference=True)[0]
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)  # BatchNorm, eval: running statistics
    mean, var = layer.running_mean.view(shape), layer.running_var.view(shape)
    w, b = layer.weight.view(shape), layer.bias.view(shape)
    return affine_from_stats(x, mean, var, w, b, layer.eps)


FUSED_CASES = [
    ("LayerNorm-768", lambda: models.LayerNorm(768), (3, 7, 768), False),
    ("LayerNorm-odd_two_dims_eps", lambda: models.LayerNorm((5, 13), eps=1e-3), (4, 5, 13), False),
    ("LayerNorm-no_bias", lambda: models.LayerNorm(33, bias=False), (6, 33), False),
    ("GroupNorm-32_groups", lambda: models.GroupNorm(8, 32), (3, 32, 7, 9), False),
    ("GroupNorm-odd_eps", lambda: models.GroupNorm(3, 9, eps=1e-3), (5, 9, 11), False),
    ("GroupNorm-one_group", lambda: models.GroupNorm(1, 6), (4, 6, 3, 3, 2), False),
    ("BatchNorm2d-eval", lambda: models.BatchNorm2d(7), (3, 7, 5, 6), True),
]


def _grads(layer: nn.Module, forward, x: Tensor, dy: Tensor) -> list[Tensor]:
    xg = x.detach().requires_grad_(True)
    params = [p for p in layer.parameters()]
    y = forward(xg)
    return [y.detach(), *torch.autograd.grad(y, [xg, *params], dy)]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize(
    ("name", "factory", "shape", "eval_mode"), FUSED_CASES, ids=[c[0] for c in FUSED_CASES]
)
def test_layer_equals_reference(name, factory, shape, eval_mode, dtype):
    """Output, input gradient and parameter gradients, against the float64 plain formula: the
    fused path in float32 / float64, the hand-written one in float16 / bfloat16."""
    gen = torch.Generator().manual_seed(3)
    layer = randomize(factory(), gen).to(dtype).train(not eval_mode)
    x = make_input(shape, gen, dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    ours = _grads(layer, layer, x, dy.to(dtype))
    path = type(layer(x.requires_grad_(True)).grad_fn).__name__
    assert (path in FUSED) == (dtype in FUSED_DTYPES), path
    exact_layer = layer.double()
    exact = _grads(exact_layer, lambda t: _reference(exact_layer, t), x.double(), dy)
    labels = ["output", "grad input", *(f"grad {n}" for n, _ in layer.named_parameters())]
    for label, a, e in zip(labels, ours, exact, strict=True):
        atol, rtol = OUTPUT[dtype] if label == "output" else GRAD[dtype]
        torch.testing.assert_close(
            a.double(), e, atol=atol, rtol=rtol, msg=lambda m, k=label: f"{name} {k}: {m}"
        )


@pytest.mark.parametrize(
    ("name", "factory", "shape", "eval_mode"), FUSED_CASES, ids=[c[0] for c in FUSED_CASES]
)
def test_fused_double_backward_equals_reference(name, factory, shape, eval_mode):
    """Second derivatives (``create_graph=True``) of a scalar made of first-order gradients."""
    gen = torch.Generator().manual_seed(4)
    layer = randomize(factory(), gen).double().train(not eval_mode)
    x = make_input(shape, gen, torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    params = list(layer.parameters())
    results = []
    for forward in (layer, lambda t: _reference(layer, t)):
        xg = x.detach().requires_grad_(True)
        first = torch.autograd.grad(forward(xg), [xg, *params], dy, create_graph=True)
        scalar = sum((g * torch.cos(g.detach())).sum() for g in first)
        # The bias gradient (a sum of dy) is constant: materialized as zeros on both sides.
        results.append(torch.autograd.grad(scalar, [xg, *params], materialize_grads=True))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, atol=GRAD[torch.float64][0], rtol=GRAD[torch.float64][1])


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3.25, -7.1, 0.1, 0.0, 1e4, 77777.7])
@pytest.mark.parametrize(
    ("name", "factory", "shape", "layout"),
    [
        ("LayerNorm", lambda: models.LayerNorm(40), (3, 5, 40), ""),
        ("GroupNorm", lambda: models.GroupNorm(4, 8), (3, 8, 6, 5), ""),
        ("GroupNorm-channels_last", lambda: models.GroupNorm(4, 8), (3, 8, 6, 5), "channels_last"),
        (
            "GroupNorm-1x1_channels_last_strides",
            lambda: models.GroupNorm(4, 8),
            (3, 8, 1, 1),
            "either",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_constant_input_gives_exactly_beta(name, factory, shape, layout, value):
    """Zero variance: ``x - mean`` is exactly 0, so the output is exactly ``beta``, on either
    path.  ATen's GroupNorm kernel *with* affine folds beta into ``x * s + (beta - mean * s)``
    and misses by up to 0.1 here, its channels-last kernel (picked from strides that also read
    as channels-last) by 1e-3: why the fused path calls it without affine, and not for those."""
    layer = randomize(factory(), torch.Generator().manual_seed(5))
    x = _cast(torch.full(shape, value), layout)
    y = layer(x)
    bias = layer.bias if name == "LayerNorm" else layer.bias.view(-1, 1, 1)
    assert torch.equal(y, bias.expand(shape)), (y - bias).abs().max()


# -- GroupNorm's folded affine: where it is kept, and how close it stays ------------------------


def _groups_at(mean_over_std: float, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """A (2, 8, 5, 6) input for 4 groups: every group standardized exactly (float64), then
    scaled by a random std in [0.5, 3] and shifted so that ``|mean| / std`` is ``mean_over_std``
    in the first group and half of it in the others."""
    x = torch.randn(2, 4, 2 * 30, generator=gen, dtype=torch.float64)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    std = 0.5 + 2.5 * torch.rand(2, 4, 1, generator=gen, dtype=torch.float64)
    ratio = torch.full((2, 4, 1), mean_over_std / 2, dtype=torch.float64)
    ratio[:, 0] = mean_over_std
    sign = torch.where(torch.rand(2, 4, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    return (x * std + sign * ratio * std).reshape(2, 8, 5, 6).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("factor", [0.99, 1.01], ids=["below", "above"])
def test_group_norm_keeps_the_folded_kernel_only_below_its_bound(dtype, factor):
    """Near-misses on both sides of :data:`FOLD_MAX_MEAN_RSTD` (eps is negligible against a
    std >= 0.5, so ``|mean| * rstd`` is ``|mean| / std``): below it the output is ATen's folded
    kernel, bit for bit (``torch.nn.functional.group_norm``, the independent oracle); above it
    not, and within the output tolerance of the float64 formula."""
    gen = torch.Generator().manual_seed(11)
    layer = randomize(models.GroupNorm(4, 8), gen).to(dtype).eval()
    x = _groups_at(FOLD_MAX_MEAN_RSTD * factor, dtype, gen)
    with torch.no_grad():
        y = layer(x)
        folded = nn.functional.group_norm(x, 4, layer.weight, layer.bias, layer.eps)
        exact = _reference(copy.deepcopy(layer).double(), x.double())
    if factor < 1:
        assert torch.equal(y, folded)
        return
    assert not torch.equal(y, folded)
    atol, rtol = OUTPUT[dtype]
    torch.testing.assert_close(y.double(), exact, atol=atol, rtol=rtol)


@pytest.mark.parametrize("value", [1e-3, -2e-3, 1e-9])
def test_group_norm_small_constant_groups_give_exactly_beta(value):
    """A constant group whose ``|mean| * rstd`` is under the bound (``rstd`` is
    ``1 / sqrt(eps)`` there) still gives exactly ``beta``: zero variance keeps the exact form."""
    layer = randomize(models.GroupNorm(4, 8), torch.Generator().manual_seed(6)).eval()
    assert abs(value) * layer.eps**-0.5 < FOLD_MAX_MEAN_RSTD
    x = torch.randn(3, 8, 6, 5, generator=torch.Generator().manual_seed(7))
    x[:, 2:4] = value  # group 1 of every sample is constant, the others are not
    with torch.no_grad():
        # a beta far under gamma * |mean| * rstd: the folded kernel's rounding of mean * s
        # would show in it
        layer.bias[2:4] = torch.tensor([3e-7, -5e-7])
        y = layer(x)
    beta = layer.bias[2:4].view(1, 2, 1, 1).expand(3, 2, 6, 5)
    assert torch.equal(y[:, 2:4], beta), (y[:, 2:4] - beta).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_group_norm_folded_error_stays_within_its_bound(dtype, seed):
    """Up to :data:`FOLD_MAX_MEAN_RSTD`, the output stays within the bound the module docstring
    derives, against the plain formula in float64 (same ``eps``):
    ``u * (3 |x - mean| r |gamma| + 5 K |gamma| + 2 |beta| + |y|)`` per element, with a factor
    2 for the statistics' own rounding (``u``: the unit roundoff)."""
    gen = torch.Generator().manual_seed(20 + seed)
    layer = randomize(models.GroupNorm(4, 8), gen).to(dtype).eval()
    x = _groups_at(FOLD_MAX_MEAN_RSTD * 0.99, dtype, gen)
    with torch.no_grad():
        y = layer(x)
        folded = nn.functional.group_norm(x, 4, layer.weight, layer.bias, layer.eps)
        ref = copy.deepcopy(layer).double()
        exact = _reference(ref, x.double())
        z = (exact - ref.bias.view(8, 1, 1)) / ref.weight.view(8, 1, 1)  # (x - mean) r
    gamma, beta = ref.weight.abs().view(8, 1, 1), ref.bias.abs().view(8, 1, 1)
    u = torch.finfo(dtype).eps / 2
    bound = 2 * u * (3 * z.abs() * gamma + 5 * FOLD_MAX_MEAN_RSTD * gamma + 2 * beta + exact.abs())
    assert torch.equal(y, folded)  # the folded kernel ran
    excess = ((y.double() - exact).abs() / bound).max().item()
    assert excess <= 1.0, f"error is {excess:.2f}x the bound"


def test_group_norm_choice_is_eager_only(caplog: pytest.LogCaptureFixture) -> None:
    """The folded-or-exact choice reads values: eager calls make it silently (no warning from
    torch's tracing checks), traced calls (``make_fx``, ``torch.export``) never make it and
    give the exact form's numbers."""
    gen = torch.Generator().manual_seed(12)
    layer = randomize(models.GroupNorm(2, 4), gen).eval()
    x = make_input((3, 4, 5), gen, torch.float32)
    with caplog.at_level("WARNING"), torch.no_grad():
        eager = layer(x)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    traced = make_fx(lambda t: layer(t))(x)
    exported = torch.export.export(layer, (x,)).module()
    exact = _reference(copy.deepcopy(layer).double(), x.double())
    for y in (traced(x), exported(x), eager):
        torch.testing.assert_close(y.double(), exact, atol=OUTPUT[torch.float32][0], rtol=1e-5)
