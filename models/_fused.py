"""PyTorch's fused CPU kernels, used where they compute what normport's own primitives compute.

:func:`models._functional.standardize` stays the one normalization primitive and the
reference.  On the CPU, for float32 and float64, ATen's kernels do the same work in one or two
passes over memory where torch primitives need four to six:

===============  ============================================  ================================
layer            kernel                                        when
===============  ============================================  ================================
LayerNorm        ``F.layer_norm``: forward, backward, double   :func:`uses_fused`: a CPU
                 backward                                      float32 / float64 input,
                                                               parameters of its dtype
GroupNorm        ``native_group_norm`` with its folded affine  :func:`uses_fused_group_norm`:
                 where no group's mean is over 4 std from 0    the same, and an input
                 and none is constant, else *without* affine   contiguous in the default
                 then ``* weight + bias`` in place; backward   layout only
                 ``native_group_norm_backward``; double
                 backward through :func:`reference_grads`
BatchNorm, eval  ``F.batch_norm(training=False)``              :func:`uses_fused`, running
                                                               statistics included
===============  ============================================  ================================

Why it is the same computation (ATen's ``layer_norm_kernel.cpp``, ``group_norm_kernel.cpp``,
``batch_norm_kernel.cpp``; pinned by ``tests/test_fast_paths.py`` against the plain formula):

* statistics per row of the ``(1, C, B)`` view LayerNorm and GroupNorm use: Welford moments
  (``RowwiseMoments``), as stable as the two-pass mean and variance (``1e4 + randn`` keeps its
  digits, a constant row has exactly zero variance); the biased variance;
  :math:`r = 1/\\sqrt{\\sigma^2 + \\epsilon}` with the same ``eps``.
* LayerNorm's output is :math:`(x r - \\mu r)\\,\\gamma + \\beta`: both products round alike,
  so a constant row still gives exactly :math:`\\beta`.
* GroupNorm's kernel folds the affine into :math:`x s + (\\beta - \\mu s)`,
  :math:`s = r \\gamma`, per channel (torch.nn.GroupNorm's output, bit for bit).  To first
  order in the unit roundoff :math:`u`, its error against the exact
  :math:`(x - \\mu) r \\gamma + \\beta` on the same statistics is at most
  :math:`u\\,(2 |x - \\mu| r |\\gamma| + 5 |\\mu| r |\\gamma| + |\\beta| + |y|)`, the exact form's
  :math:`u\\,(3 |x - \\mu| r |\\gamma| + |y|)`: the extra term grows with :math:`|\\mu| r`, the
  group's offset in standard deviations, and misses :math:`\\beta` on constant groups (by
  4e-5 at 3.25, by 0.1 at 1e4).  So the folded output is kept only where every group has
  :math:`|\\mu| r \\le` :data:`FOLD_MAX_MEAN_RSTD` (= 4: at most :math:`20 u |\\gamma|` extra,
  ``tests/test_fast_paths.py`` checks the bound) and none has (near) zero variance; activations
  are rarely offset by more than a few standard deviations.  Otherwise the kernel runs again
  *without* affine, which computes :math:`(x - \\mu) r`, and the affine follows as in
  :func:`standardize` (two more passes: 1.3x torch.nn in eval, why the folded form is kept
  where it is this close).  Traced code (``torch.compile``, ``torch.export``, TorchScript,
  FX, fake / proxy tensors) makes no data-dependent choice: it always takes the exact form.
* BatchNorm's eval kernel is :func:`models._functional.affine_from_stats`'s formula,
  :math:`x s + t` with :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`,
  :math:`t = \\beta - \\mu s`, in one pass instead of two.
* the backward passes are ATen's closed forms, the formula of :func:`standardize`'s backward
  with the mean folded in; their float32 error stays of the order of the hand-written one (the
  rounding of ``x`` itself dominates).

The hand-written path runs everywhere else:

* float16 / bfloat16: ATen's CPU forward accumulates in float32, but its LayerNorm backward's
  weight and bias gradients carry 5x to 400x the error of :func:`standardize`'s float32 sums
  (measured against float64), and GroupNorm's output would be rounded to the half type before
  the affine;
* channels-last GroupNorm inputs, and those whose strides read either way (``(N, C, 1, 1)``,
  ``(N, 1, H, W)``): from channels-last strides ATen picks its channels-last kernel, which
  computes :math:`E[x^2] - E[x]^2` (a constant 123.456 comes out 0.013 off);
* other devices (their kernels are not checked here), empty inputs, mixed dtypes;
* tensor subclasses and ``__torch_function__`` modes, which keep seeing the primitive ops they
  saw before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normport.models._functional import reference_grads

__all__ = [
    "FOLD_MAX_MEAN_RSTD",
    "FUSED_DTYPES",
    "group_norm",
    "uses_fused",
    "uses_fused_group_norm",
]

FUSED_DTYPES = (torch.float32, torch.float64)


def uses_fused(x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``x`` and the layer's parameters (None for an absent one) take ATen's kernel: a
    non-empty CPU tensor of a :data:`FUSED_DTYPES` dtype, parameters of the same dtype and
    device, and no ``__torch_function__`` override on any of them."""
    tensors = [x, *(p for p in params if p is not None)]
    return (
        x.device.type == "cpu"
        and x.dtype in FUSED_DTYPES
        and x.numel() > 0
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and not torch.overrides.has_torch_function(tensors)
    )


def uses_fused_group_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """:func:`uses_fused`, and ``x`` contiguous in the default layout only: not where its
    strides also read as channels-last (``(N, C, 1, 1)``, ``(N, 1, H, W)``), the layout from
    which ATen picks its channels-last kernel."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return (
        uses_fused(x, weight, bias)
        and x.is_contiguous()
        and (layout is None or not x.is_contiguous(memory_format=layout))
    )


FOLD_MAX_MEAN_RSTD = 4.0
"""The largest :math:`|\\mu_{ng}|\\, r_{ng}` of any group for which :func:`_forward` keeps the
folded kernel's output (module docstring)."""


_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)


def _eager() -> bool:
    """Whether this runs eagerly on real tensors: not traced by dynamo (``torch.compile``,
    ``torch.export``), TorchScript, FX, or under a fake / proxy tensor mode (``make_fx``,
    AOTAutograd), where the data-dependent choice of :func:`_fold_is_close` has no place (a
    graph break, an error, or one branch baked in); the exact form is traced instead."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)
    )


def _fold_is_close(mean: Tensor, rstd: Tensor, eps: float) -> bool:
    """Whether the folded affine :math:`x s + (\\beta - \\mu s)` stays within a few rounding
    units of :math:`(x - \\mu)\\, r\\, \\gamma + \\beta` for every group: each group's
    :math:`|\\mu|\\, r \\le` :data:`FOLD_MAX_MEAN_RSTD`, and none of (near) zero variance,
    :math:`r < 0.999 / \\sqrt{\\epsilon}` (a constant group must give exactly :math:`\\beta`)."""
    worst = (mean.abs() * rstd).max().item()
    return worst <= FOLD_MAX_MEAN_RSTD and rstd.max().item() < 0.999 / math.sqrt(eps)


def _forward(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: ATen's GroupNorm with its folded affine where
    :func:`_fold_is_close`, else ATen's GroupNorm without affine, then the affine in place."""
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    if (weight is not None or bias is not None) and _eager():
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        if _fold_is_close(mean, rstd, eps):
            return y, mean, rstd
    y, mean, rstd = torch.native_group_norm(x, None, None, n, c, hw, groups, eps)
    y3 = y.view(n, c, hw)  # y itself is returned: a view made here could not be modified
    if weight is not None:
        y3.mul_(weight.view(c, 1))
    if bias is not None:
        y3.add_(bias.view(c, 1))
    return y, mean, rstd


class _GroupNorm(torch.autograd.Function):
    """GroupNorm on ATen's kernel without affine, the per-channel affine applied in place."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        y, mean, rstd = _forward(x, groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, groups = x.shape[0], x.shape[1], ctx.groups
        hw = math.prod(x.shape[2:])
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the plain formula so that higher orders are exact.
            shape = (c,) + (1,) * (x.dim() - 2)
            w = None if weight is None else weight.view(shape)
            b = None if bias is None else bias.view(shape)
            view = (1, n * groups, x.numel() // (n * groups))
            gx, gw, gb = reference_grads(dy, x, view, w, b, ctx.eps)
            gw = None if gw is None else gw.reshape(c)
            gb = None if gb is None else gb.reshape(c)
            return gx, None, gw, gb, None
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        mask = [need_x, need_w, need_b]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x, mean, rstd, weight, n, c, hw, groups, mask
        )
        return gx, None, gw, gb, None


def group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """GroupNorm of a contiguous ``(N, C, *S)`` input with per-channel ``(C,)`` parameters, on
    ATen's kernel (the caller checks :func:`uses_fused_group_norm`)."""
    tensors = (x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GroupNorm.apply(x, groups, weight, bias, eps)
    return _forward(x, groups, weight, bias, eps)[0]  # no autograd Function's overhead
