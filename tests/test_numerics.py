"""Numerical behaviour: large offsets, constant inputs, half-precision accumulation, gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normport import models

# (id, normport factory, torch.nn factory, input shape); all in training mode.
LAYERS = [
    ("BatchNorm2d", lambda: models.BatchNorm2d(4), lambda: nn.BatchNorm2d(4), (6, 4, 5, 5)),
    ("SequenceBatchNorm", lambda: models.SequenceBatchNorm(4), None, (6, 5, 4)),
    (
        "InstanceNorm2d",
        lambda: models.InstanceNorm2d(4, affine=True),
        lambda: nn.InstanceNorm2d(4, affine=True),
        (3, 4, 6, 6),
    ),
    ("GroupNorm", lambda: models.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (3, 4, 6, 6)),
    ("LayerNorm", lambda: models.LayerNorm(64), lambda: nn.LayerNorm(64), (3, 5, 64)),
    ("RMSNorm", lambda: models.RMSNorm(64, eps=1e-5), lambda: nn.RMSNorm(64, eps=1e-5), (3, 5, 64)),
    ("SwitchableNorm2d", lambda: models.SwitchableNorm2d(4), None, (6, 4, 5, 5)),
]


def _randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    return layer


def _exact(layer_factory, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The layer's own math in float64: the precision yardstick for float32 runs."""
    layer = _randomized(layer_factory(), seed).double()
    return layer(x.double())


@pytest.mark.parametrize(("name", "ours", "twin", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_large_offset_keeps_precision(name, ours, twin, shape):
    """1e4 + randn: a one-pass E[x^2] - E[x]^2 would lose every digit of the variance."""
    if name == "RMSNorm":
        pytest.skip("RMSNorm does not centre: an offset is signal, not noise")
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    y = _randomized(ours(), 1)(x)
    exact = _exact(ours, x, 1)
    # float32 holds 1e4 to ~1e-3 absolute, i.e. ~1e-3 relative to the unit-variance signal.
    torch.testing.assert_close(y.double(), exact, atol=5e-3, rtol=1e-3)
    if twin is not None:
        torch.testing.assert_close(y, _randomized(twin(), 1)(x), atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize(("name", "ours", "twin", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_constant_input_gives_bias(name, ours, twin, shape):
    """Zero variance: the output is exactly beta (the centred input is 0), with finite grads."""
    x = torch.full(shape, 3.25, requires_grad=True)
    layer = _randomized(ours(), 2)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    if twin is not None:
        # torch.nn's fused kernels leave a few 1e-5 of rounding here; normport is exact.
        torch.testing.assert_close(y, _randomized(twin(), 2)(x), atol=1e-4, rtol=1e-4)
    if name != "RMSNorm":
        channel_first = x.dim() > 2 and name not in ("LayerNorm", "SequenceBatchNorm")
        bias = layer.bias.view((-1,) + (1,) * (x.dim() - 2)) if channel_first else layer.bias
        torch.testing.assert_close(y, bias.expand(shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "ours", "twin", "shape"), LAYERS, ids=[c[0] for c in LAYERS])
def test_half_precision_accumulates_in_float32(name, ours, twin, shape, dtype):
    """Values near 300 over thousands of elements: a float16 sum would overflow (> 65504)."""
    big = (
        (shape[0], *shape[1:-1], 2048)
        if name in ("LayerNorm", "RMSNorm")
        else (*shape[:-2], 40, 40)
    )
    if name == "SequenceBatchNorm":
        big = (8, 300, shape[-1])
    factory = (
        (lambda: models.LayerNorm(2048))
        if name == "LayerNorm"
        else ((lambda: models.RMSNorm(2048, eps=1e-5)) if name == "RMSNorm" else ours)
    )
    gen = torch.Generator().manual_seed(4)
    x = (300 + 20 * torch.randn(big, generator=gen)).to(dtype)
    layer = _randomized(factory(), 5).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    exact = _randomized(factory(), 5).to(dtype).double()(x.double())
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.double(), exact, atol=tol, rtol=tol)


GRADCHECK = [
    ("BatchNorm1d-train", lambda: models.BatchNorm1d(3), (4, 3, 2), True),
    ("BatchNorm2d-eval", lambda: models.BatchNorm2d(3), (2, 3, 2, 2), False),
    ("SequenceBatchNorm-train", lambda: models.SequenceBatchNorm(3), (2, 3, 3), True),
    ("InstanceNorm1d-train", lambda: models.InstanceNorm1d(3, affine=True), (2, 3, 4), True),
    ("GroupNorm", lambda: models.GroupNorm(2, 4), (2, 4, 3), True),
    ("LayerNorm", lambda: models.LayerNorm((2, 3)), (2, 2, 3), True),
    ("RMSNorm", lambda: models.RMSNorm(4, eps=1e-3), (3, 4), True),
    ("SwitchableNorm1d-train", lambda: models.SwitchableNorm1d(3), (3, 3, 4), True),
    ("SwitchableNorm2d-eval", lambda: models.SwitchableNorm2d(3), (2, 3, 2, 2), False),
]


@pytest.mark.parametrize(
    ("name", "factory", "shape", "train"), GRADCHECK, ids=[g[0] for g in GRADCHECK]
)
def test_gradcheck_and_gradgradcheck(name, factory, shape, train):
    """Finite differences agree with the closed-form backward, and with double backward."""
    layer = _randomized(factory(), 6).double().train(train)
    params = [p for p in layer.parameters()]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        with torch.no_grad():
            for p, v in zip(params, ps, strict=True):
                p.data = v.data
        state = {k: v.clone() for k, v in layer.named_buffers()}
        out = torch.func.functional_call(
            layer,
            {**dict(zip([n for n, _ in layer.named_parameters()], ps, strict=True)), **state},
            (x,),
        )
        return out

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)
