"""The one normalization primitive every normport layer is built on.

Every layer normalizes the same way; only the *view* of its input differs. The input is
viewed as ``(A, C, B)`` and statistics are taken per ``C`` over the ``A`` and ``B`` axes:

==================  =====================  =======================================
layer               input                  view ``(A, C, B)``
==================  =====================  =======================================
BatchNorm           ``(N, C, *S)``         ``(N, C, prod(S))``
SequenceBatchNorm   ``(N, L, C)``          ``(N * L, C, 1)``
InstanceNorm        ``(N, C, *S)``         ``(1, N * C, prod(S))``
GroupNorm           ``(N, C, *S)``, G      ``(1, N * G, (C / G) * prod(S))``
LayerNorm, RMSNorm  ``(*R, *K)``           ``(1, prod(R), prod(K))``
==================  =====================  =======================================

.. math::

    \\mu_c = \\frac{1}{n} \\sum_{a,b} x_{acb}, \\qquad
    \\sigma^2_c = \\frac{1}{n} \\sum_{a,b} (x_{acb} - \\mu_c)^2 \\quad (\\text{biased}),
    \\qquad n = A \\cdot B

    y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\cdot \\gamma + \\beta

RMSNorm skips the centring (:math:`\\mu = 0`).  The variance is computed in two passes
(mean first, then the squared deviations), so ``1e4 + randn(...)`` keeps its precision and a
constant input gives exactly zero variance.  float16 / bfloat16 inputs accumulate in float32;
the output has the input's dtype.

The forward pass works in place on one fresh buffer and the backward pass is the closed form

.. math::

    \\frac{\\partial L}{\\partial x} = \\frac{1}{\\sqrt{\\sigma^2 + \\epsilon}}
    \\Big(g - \\overline{g} - \\hat{x}\\, \\overline{g \\hat{x}}\\Big), \\qquad g = \\gamma\\,
    \\frac{\\partial L}{\\partial y}

(bars are means over the statistics axes), which is what keeps the hand-written layers within
reach of PyTorch's fused kernels.  Double backward (``create_graph=True``) differentiates
the plain formula (:func:`standardize` with ``reference=True``) instead, so higher-order
gradients stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "accumulate_dtype",
    "affine_from_stats",
    "reference_grads",
    "standardize",
]

View3 = tuple[int, int, int]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def _sum02(t: Tensor) -> Tensor:
    """Per-channel sum of an ``(A, C, B)`` tensor over axes 0 and 2, shaped ``(1, C, 1)``.

    Reduces the contiguous innermost axis first.  Sums across rows (over ``A``) go through a
    matrix-vector product: several times faster on CPU than ``sum(0)`` on a tall matrix.
    """
    a, c, b = t.shape
    if a == 1 and b == 1:
        return t.clone()  # always a fresh tensor: callers divide it in place
    s = t.sum(2) if b > 1 else t.view(a, c)
    if a == 1:
        return s.view(1, c, 1)
    if s.is_floating_point() and s.device.type == "cpu":
        return torch.mv(s.t(), s.new_ones(a)).view(1, c, 1)
    return s.sum(0).view(1, c, 1)


def _sum_squares(d: Tensor) -> Tensor:
    """Per-channel sum of squares of an ``(A, C, B)`` tensor, shaped ``(1, C, 1)``.

    ``linalg.vector_norm`` over the contiguous innermost axis is several times faster than
    ``(d * d).sum(...)`` (no temporary) and than ``var`` (Welford, element by element); across
    rows (``B == 1``) it is slow, and the squared temporary wins.
    """
    if d.shape[2] == 1:
        return _sum02(d * d)
    return _sum02(torch.linalg.vector_norm(d, dim=2, keepdim=True).square_())


def _param_view(x_shape: torch.Size, p_shape: torch.Size) -> tuple[int, int, int]:
    """``(A, M, T)``: ``x`` viewed so that a parameter broadcast against it varies along M only.

    Parameters are laid out as ``(C, 1, ..., 1)`` (per channel) or ``normalized_shape``
    (trailing), so their non-singleton axes are contiguous in ``x``: ``(N, C, H, W)`` with a
    ``(C, 1, 1)`` weight gives ``(N, C, H * W)``; ``(N, L, D)`` with a ``(D,)`` weight gives
    ``(N * L, D, 1)``.
    """
    k = len(p_shape)
    ones = 0
    while ones < k and p_shape[k - 1 - ones] == 1:
        ones += 1
    lead, split = len(x_shape) - k, len(x_shape) - ones
    return (
        math.prod(x_shape[:lead]),
        math.prod(x_shape[lead:split]),
        math.prod(x_shape[split:]),
    )


def _per_stat_channel(view: View3, x_shape: torch.Size, p_shape: torch.Size) -> bool:
    """Whether a parameter is constant within each statistics channel (BatchNorm,
    InstanceNorm: per channel), so that ``invstd`` and ``weight`` fold into one scale."""
    a, m, t = _param_view(x_shape, p_shape)
    return t == view[2] and view[1] % m == 0 and a * m == view[0] * view[1]


def _centred(x3: Tensor, mean: Tensor | None, acc: torch.dtype, shape: torch.Size) -> Tensor:
    """A fresh contiguous ``acc``-typed buffer of ``shape`` (the input's) holding ``x - mean``
    (or a copy of ``x`` when not centring); callers work on its ``(A, C, B)`` view.

    The buffer is allocated in the input's shape, not the view's, so that the layer can return
    it as is: an output that is a view of a tensor made inside an autograd Function may not be
    modified in place (``nn.ReLU(inplace=True)`` after the layer would raise).
    """
    out = torch.empty(shape, dtype=acc, device=x3.device)
    if mean is None:
        out.view(x3.shape).copy_(x3)
    else:
        torch.sub(x3, mean, out=out.view(x3.shape))
    return out


class _Standardize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with batch statistics, closed-form backward."""

    @staticmethod
    def forward(ctx, x, view, weight, bias, eps, center):
        acc = accumulate_dtype(x.dtype)
        x3 = x.reshape(view)
        n = view[0] * view[2]
        mean = _sum02(x3.to(acc) if x3.dtype != acc else x3).div_(n) if center else None
        y = _centred(x3, mean, acc, x.shape)  # shaped like x: returned as is, never a view
        y3 = y.view(view)
        var = _sum_squares(y3).div_(n)
        invstd = torch.rsqrt(var + eps)
        folded = weight is not None and _per_stat_channel(view, x.shape, weight.shape)
        if folded:  # one pass with scale = invstd * weight instead of two
            a, m, t = _param_view(x.shape, weight.shape)
            y.view(a, m, t).mul_(invstd.view(-1, m, 1) * weight.reshape(1, m, 1))
        else:
            y3.mul_(invstd)
        if weight is not None and not folded:
            y.mul_(weight)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.view, ctx.eps, ctx.center = view, eps, center
        stats = (var,) if mean is None else (mean, var)
        ctx.mark_non_differentiable(*stats)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        view, center = ctx.view, ctx.center
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the plain formula so that higher orders are exact.
            gx, gw, gb = reference_grads(dy, x, view, weight, bias, ctx.eps, center)
            return gx, None, gw, gb, None, None

        acc = invstd.dtype
        need_x, _, need_w, need_b, _, _ = ctx.needs_input_grad
        dy = dy.to(acc).contiguous()
        x3, n = x.reshape(view), view[0] * view[2]
        grad_b = _sum_like(dy, bias).to(bias.dtype) if need_b else None
        if not (need_x or need_w):
            return None, None, None, grad_b, None, None
        # One full-size buffer: on CPU, page-faulting fresh memory costs more than arithmetic.
        # `out` holds dy * xhat (for the weight gradient and the row sums), then the input
        # gradient; xhat is recomputed from x rather than stored.
        out_x = _centred(x3, mean, acc, x.shape)
        out = out_x.view(view)
        out.mul_(invstd)
        out_x.mul_(dy)
        grad_w = _sum_like(out_x, weight).to(weight.dtype) if need_w else None
        if not need_x:
            return None, None, grad_w, grad_b, None, None
        per_channel = weight is not None and _per_stat_channel(view, x.shape, weight.shape)
        if weight is not None and not per_channel:
            out_x.mul_(weight)
        g_xhat = _sum02(out)  # sum of g * xhat per statistics channel, g = dy * weight
        if per_channel:
            g_xhat = g_xhat * _stat_layout(weight, view, x.shape)
        # grad_x = invstd * (g - mean(g) - xhat * mean(g * xhat))
        scale = invstd * g_xhat.div_(-n)
        if mean is None:
            torch.mul(x3, scale, out=out)
        else:
            torch.sub(x3, mean, out=out).mul_(scale)
        if weight is None:
            out_x.add_(dy)
        else:
            out_x.addcmul_(dy, weight)
        if center:
            out.sub_(_weighted_sum02(dy, weight, view, per_channel).div_(n))
        out.mul_(invstd)
        return out_x.to(x.dtype), None, grad_w, grad_b, None, None


def _stat_layout(param: Tensor, view: View3, x_shape: torch.Size) -> Tensor:
    """A per-statistics-channel parameter laid out as ``(1, C, 1)`` like the statistics."""
    m = _param_view(x_shape, param.shape)[1]
    return param.reshape(1, m).expand(view[1] // m, m).reshape(1, view[1], 1)


def _weighted_sum02(dy: Tensor, weight: Tensor | None, view: View3, per_channel: bool) -> Tensor:
    """``sum(dy * weight)`` per statistics channel, shaped ``(1, C, 1)``, without a temporary
    the size of ``dy`` for the layouts normport's layers use."""
    a, c, b = view
    if weight is None:
        return _sum02(dy.view(view))
    if per_channel:
        return _sum02(dy.view(view)) * _stat_layout(weight, view, dy.shape)
    ap, m, t = _param_view(dy.shape, weight.shape)
    if t == 1 and m == b:  # LayerNorm, RMSNorm: weight varies along the statistics axis
        return (
            torch.mv(dy.view(ap, m), weight.reshape(m).to(dy.dtype)).view(a, c).sum(0).view(1, c, 1)
        )
    if t > 1 and b % t == 0:  # GroupNorm: weight per channel, statistics per group
        per_param = dy.view(ap, m, t).sum(2).mul_(weight.reshape(1, m))
        return _sum02(per_param.view(a, c, b // t))
    return _sum02((dy * weight).view(view))


def _sum_like(t: Tensor, param: Tensor) -> Tensor:
    """Sum ``t`` down to the shape of a parameter that was broadcast against it."""
    a, m, b = _param_view(t.shape, param.shape)
    return _sum02(t.reshape(a, m, b)).view(param.shape)


def standardize(
    x: Tensor,
    view: View3,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool = True,
    *,
    reference: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Normalize ``x`` with statistics over axes 0 and 2 of ``x.reshape(view)``.

    Args:
        x: the input, any shape with ``x.numel() == prod(view)``.
        view: ``(A, C, B)``; statistics are per ``C``.
        weight, bias: broadcastable to ``x.shape`` (already laid out by the caller), or None.
        eps: added to the variance before the square root.
        center: False for RMS normalization (no mean subtraction).
        reference: compute the same thing in plain differentiable ops (slow, every derivative
            order exact) instead of the fused in-place kernel with its closed-form backward;
            that backward differentiates this path under ``create_graph=True``.

    Returns:
        ``(y, mean, var)``: ``y`` in ``x.dtype``, a fresh tensor shaped like ``x`` (not a view,
        so in-place ops such as ``relu_`` may follow); ``mean`` (None when not centring) and the
        biased ``var``, both shaped ``(1, C, 1)`` in the accumulation dtype (detached unless
        ``reference``).

    Example::

        >>> x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
        >>> y, mean, var = standardize(x, (1, 2, 2), None, None, eps=0.0)
        >>> y.tolist(), mean.flatten().tolist(), var.flatten().tolist()
        ([[-1.0, 1.0], [-1.0, 1.0]], [2.0, 6.0], [1.0, 1.0])
    """
    if not reference:
        return _Standardize.apply(x, view, weight, bias, eps, center)
    acc = accumulate_dtype(x.dtype)
    x3 = x.reshape(view).to(acc)
    mean = x3.mean((0, 2), keepdim=True) if center else None
    d = x3 - mean if center else x3
    var = d.square().mean((0, 2), keepdim=True)
    y = (d * torch.rsqrt(var + eps)).view(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean, var


def reference_grads(
    dy: Tensor,
    x: Tensor,
    view: View3,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`standardize` (``reference=True``) with respect to ``x``, ``weight``
    and ``bias``, kept differentiable: a fused backward calls this under ``create_graph=True``
    so that every higher derivative is exact.  None for what does not require grad."""
    tensors = (x, weight, bias)
    inputs = [t for t in tensors if t is not None and t.requires_grad]
    y = standardize(x, view, weight, bias, eps, center, reference=True)[0]
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    gx, gw, gb = (next(grads) if t is not None and t.requires_grad else None for t in tensors)
    return gx, gw, gb


def affine_from_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    centred: bool = False,
) -> Tensor:
    """Normalize with given statistics (running ones, or Switchable Norm's mixture).

    .. math::

        y = x \\cdot s + t, \\qquad s = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}},
        \\qquad t = \\beta - \\mu\\, s

    The folded form is one multiply and one in-place add, as PyTorch's eval BatchNorm.  When
    ``mean`` varies per sample (``centred=True``) it is computed as
    :math:`(x - \\mu)\\, s + \\beta` instead, which stays exact where ``x`` is constant
    (:math:`x s` and :math:`\\mu s` would cancel catastrophically).

    ``mean``, ``var``, ``weight`` and ``bias`` must already broadcast against ``x``; gradients
    flow to every tensor that requires them.
    """
    acc = accumulate_dtype(x.dtype)
    xa = x if x.dtype == acc else x.to(acc)
    scale = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight
    if centred:
        y = (xa - mean) * scale
        shift = bias
    else:
        # A broadcast addcmul is 2x slower than mul + in-place add on CPU.
        y = xa * scale
        shift = -mean.to(acc) * scale
        if bias is not None:
            shift = shift + bias
    if shift is not None:
        y.add_(shift)
    return y if y.dtype == x.dtype else y.to(x.dtype)
