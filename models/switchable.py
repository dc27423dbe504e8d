"""Switchable Normalization (Luo et al., 2018, "Differentiable Learning-to-Normalize via
Switchable Normalization").

Per sample ``n`` and channel ``c`` over the spatial positions ``S`` (``|S| = HW``), the
instance statistics are

.. math::

    \\mu^{in}_{nc} = \\frac{1}{|S|}\\sum_{s} x_{ncs}, \\qquad
    \\sigma^{2,in}_{nc} = \\frac{1}{|S|}\\sum_{s} (x_{ncs} - \\mu^{in}_{nc})^2

and the layer and batch statistics are their averages over channels and over the batch
(paper, eq. 4), written here with the law of total variance so that no ``E[x^2] - E[x]^2``
cancellation happens:

.. math::

    \\mu^{ln}_n = \\overline{\\mu^{in}_{n\\cdot}}, \\quad
    \\sigma^{2,ln}_n = \\overline{\\sigma^{2,in}_{n\\cdot}}
        + \\overline{(\\mu^{in}_{n\\cdot} - \\mu^{ln}_n)^2}, \\qquad
    \\mu^{bn}_c = \\overline{\\mu^{in}_{\\cdot c}}, \\quad
    \\sigma^{2,bn}_c = \\overline{\\sigma^{2,in}_{\\cdot c}}
        + \\overline{(\\mu^{in}_{\\cdot c} - \\mu^{bn}_c)^2}

The layer mixes them with softmax weights (``mean_weight``, ``var_weight``, three logits each,
ordered instance, layer, batch):

.. math::

    y = \\gamma \\frac{x - \\sum_k w_k \\mu^k}{\\sqrt{\\sum_k w'_k \\sigma^{2,k} + \\epsilon}}
        + \\beta, \\qquad
    w = \\mathrm{softmax}(\\lambda_\\mu), \\quad w' = \\mathrm{softmax}(\\lambda_\\sigma)

The batch branch keeps running estimates through the shared :class:`models._base.NormBase`
(momentum or cumulative average, unbiased ``running_var``); in eval they replace
:math:`\\mu^{bn}, \\sigma^{2,bn}` unless ``track_running_stats=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normport.models._affine import affine_view
from normport.models._base import NormBase
from normport.models._functional import accumulate_dtype, affine_from_stats
from normport.models._shapes import channel_shape, check_rank

__all__ = ["SwitchableNorm1d", "SwitchableNorm2d"]


class _SwitchableNorm(NormBase):
    _ranks: tuple[int, ...] = ()

    def _register_extra(self, device: Any, dtype: Any) -> None:
        # Mixture logits, ordered instance, layer, batch (uniform weights after a reset).
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        check_rank(x, self._ranks)
        self._check_channels(x, 1)
        n, c = x.shape[0], x.shape[1]
        acc = accumulate_dtype(x.dtype)
        x3 = x.reshape(n, c, -1).to(acc)
        mean_in = x3.mean(-1, keepdim=True)
        var_in = (x3 - mean_in).square().mean(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = var_in.mean(1, keepdim=True) + (mean_in - mean_ln).square().mean(1, keepdim=True)
        if self._uses_batch_stats():
            count = n * x3.shape[-1]
            if count <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{x.size()}"
                )
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = var_in.mean(0, keepdim=True) + (mean_in - mean_bn).square().mean(
                0, keepdim=True
            )
            factor = self._update_factor()
            if factor is not None:
                self._update_running(
                    mean_bn.detach().flatten(), var_bn.detach().flatten(), count, factor
                )
        else:
            mean_bn, var_bn = (s.to(acc) for s in self._running((1, c, 1)))
        wm = torch.softmax(self.mean_weight.to(acc), 0)
        wv = torch.softmax(self.var_weight.to(acc), 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        shape = (n, c) + (1,) * (x.dim() - 2)
        per_channel = channel_shape(x, 1)
        weight, bias = affine_view(self, per_channel)
        return affine_from_stats(
            x, mean.view(shape), var.view(shape), weight, bias, self.eps, centred=True
        )


class SwitchableNorm1d(_SwitchableNorm):
    """Switchable normalization over ``(N, C, L)``."""

    _ranks = (3,)


class SwitchableNorm2d(_SwitchableNorm):
    """Switchable normalization over ``(N, C, H, W)``."""

    _ranks = (4,)
