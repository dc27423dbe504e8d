"""Switchable Norm against a plain float64 reference written from the paper's equations.

Luo et al. 2018, eq. (3)-(5): statistics of the instance (per n, c over HW), layer (per n over
C, HW) and batch (per c over N, HW) scopes computed *directly* over their sets, mixed with
softmax weights; the batch scope uses running estimates at inference.
"""

from __future__ import annotations

import pytest
import torch

from normport import models
from normport.models.randomize import randomize
from tests.cases import make_input


def paper_reference(x, mean_logits, var_logits, weight, bias, eps, batch_stats=None):
    """Direct equations in float64; ``batch_stats`` = (mean, var) overrides the batch scope."""
    x = x.double()
    n, c = x.shape[:2]
    h = x.reshape(n, c, -1)
    mu_in, var_in = h.mean(2), h.var(2, correction=0)  # (N, C)
    mu_ln, var_ln = h.reshape(n, -1).mean(1), h.reshape(n, -1).var(1, correction=0)  # (N,)
    hb = h.transpose(0, 1).reshape(c, -1)
    mu_bn, var_bn = hb.mean(1), hb.var(1, correction=0)  # (C,)
    if batch_stats is not None:
        mu_bn, var_bn = (s.double() for s in batch_stats)
    wm = torch.softmax(mean_logits.double(), 0)
    wv = torch.softmax(var_logits.double(), 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln[:, None] + wm[2] * mu_bn[None, :]
    var = wv[0] * var_in + wv[1] * var_ln[:, None] + wv[2] * var_bn[None, :]
    y = (h - mu[..., None]) / torch.sqrt(var[..., None] + eps)
    y = y.reshape(x.shape)
    if weight is not None:
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = y * weight.double().view(shape) + bias.double().view(shape)
    count = h.shape[0] * h.shape[2]
    return y, hb.mean(1), hb.var(1, correction=0) * count / (count - 1)


CONFIGS = {
    "affine_momentum": {"momentum": 0.1},
    "affine_cumulative_average": {"momentum": None},
    "no_affine_eps": {"affine": False, "eps": 1e-3, "momentum": 0.5},
    "no_tracking": {"track_running_stats": False},
}
LAYERS = {
    "SwitchableNorm1d": (models.SwitchableNorm1d, (5, 7)),
    "SwitchableNorm2d": (models.SwitchableNorm2d, (5, 4, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_matches_paper_equations(layer, config, dtype):
    cls, rest = LAYERS[layer]
    gen = torch.Generator().manual_seed(11)
    sn = cls(5, **CONFIGS[config])
    randomize(sn, gen)
    sn = sn.to(dtype)
    tracking = sn.track_running_stats
    run_mean = sn.running_mean.double().clone() if tracking else None
    run_var = sn.running_var.double().clone() if tracking else None
    count = 3  # randomize() sets num_batches_tracked = 3
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    for step, batch in enumerate((4, 6, 3, 5, 2)):
        x = make_input((batch, *rest), gen, dtype).requires_grad_(True)
        y = sn(x)
        params = (sn.mean_weight, sn.var_weight, sn.weight, sn.bias, sn.eps)
        ref, mean_b, var_b = paper_reference(x, *params)
        torch.testing.assert_close(
            y.double(), ref, **tol, msg=lambda m, step=step: f"step {step}: {m}"
        )
        # Gradients: autograd through the reference equations is the oracle.
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        y.backward(g.to(dtype))
        leaves = [x] + [
            p for p in (sn.mean_weight, sn.var_weight, sn.weight, sn.bias) if p is not None
        ]
        ours = [t.grad.double().clone() for t in leaves]
        for t in leaves:
            t.grad = None
        ref_grads = torch.autograd.grad(ref, leaves, g)
        for i, (a, b) in enumerate(zip(ours, ref_grads, strict=True)):
            torch.testing.assert_close(a, b.double(), **tol, msg=lambda m, i=i: f"grad {i}: {m}")
        if tracking:
            count += 1
            m = sn.momentum if sn.momentum is not None else 1.0 / count
            run_mean = (1 - m) * run_mean + m * mean_b.detach()
            run_var = (1 - m) * run_var + m * var_b.detach()
            torch.testing.assert_close(sn.running_mean.double(), run_mean, **tol)
            torch.testing.assert_close(sn.running_var.double(), run_var, **tol)
    sn.eval()
    x = make_input((3, *rest), gen, dtype)
    with torch.no_grad():
        stats = (sn.running_mean, sn.running_var) if tracking else None
        ref, _, _ = paper_reference(x, *params, batch_stats=stats)
        torch.testing.assert_close(sn(x).double(), ref, **tol)


def test_eval_output_of_a_sample_is_batch_independent_only_with_tracking():
    gen = torch.Generator().manual_seed(12)
    tracked, untracked = (
        models.SwitchableNorm2d(4),
        models.SwitchableNorm2d(4, track_running_stats=False),
    )
    for sn in (tracked, untracked):
        randomize(sn, gen)
        sn.eval()
    x = make_input((3, 4, 5, 5), gen, torch.float64).float()
    with torch.no_grad():
        torch.testing.assert_close(tracked(x)[:1], tracked(x[:1]))
        assert not torch.allclose(untracked(x)[:1], untracked(x[:1]), atol=1e-3)
