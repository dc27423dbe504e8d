"""Batch normalization: statistics over the batch (and spatial / sequence) axes, per channel.

.. math::

    y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\cdot \\gamma + \\beta

In training, ``E`` and ``Var`` (biased) are taken per channel over every axis but the channel
one, and the running statistics are updated as described in :class:`models._base.NormBase`
(unbiased variance, momentum or cumulative average).  In eval with tracked statistics the
running ones are used, folded into one multiply-add :math:`y = x s + t`
(:func:`models._functional.affine_from_stats`).  That is the very formula of ATen's eval
kernel, which runs instead for channel-first inputs on the CPU in float32 / float64 with
parameters and statistics of the input's dtype (:func:`models._fused.uses_fused`): one pass
instead of two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normport.models._affine import affine_view
from normport.models._base import NormBase
from normport.models._functional import affine_from_stats, standardize
from normport.models._fused import uses_fused
from normport.models._shapes import channel_shape, check_rank

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SequenceBatchNorm",
    "TorchSequenceBatchNorm",
]


class _BatchNorm(NormBase):
    """Batch normalization over ``(N, C, *S)``; leaves set the accepted ranks."""

    _ranks: tuple[int, ...] = ()
    _channel_dim = 1

    def _view(self, x: Tensor) -> tuple[int, int, int]:
        return (x.shape[0], x.shape[1], math.prod(x.shape[2:]))

    def forward(self, input: Tensor) -> Tensor:
        x = input
        check_rank(x, self._ranks)
        self._check_channels(x, self._channel_dim)
        per_channel = channel_shape(x, self._channel_dim)
        weight, bias = affine_view(self, per_channel)
        if not self._uses_batch_stats():
            running = (self.running_mean, self.running_var)
            if self._channel_dim == 1 and uses_fused(x, self.weight, self.bias, *running):
                return F.batch_norm(x, *running, self.weight, self.bias, False, 0.0, self.eps)
            mean, var = self._running(per_channel)
            return affine_from_stats(x, mean, var, weight, bias, self.eps)
        view = self._view(x)
        n = view[0] * view[2]
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()}"
            )
        factor = self._update_factor()
        y, mean, var = standardize(x, view, weight, bias, self.eps)
        if factor is not None:
            self._update_running(mean.flatten(), var.flatten(), n, factor)
        return y


class BatchNorm1d(_BatchNorm):
    """Batch normalization over ``(N, C)`` or ``(N, C, L)``; twin of ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over ``(N, C, H, W)``; twin of ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over ``(N, C, D, H, W)``; twin of ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)


class SequenceBatchNorm(_BatchNorm):
    """Batch normalization of channel-last sequences ``(N, L, C)``, statistics over (N, L).

    Equal to ``torch.nn.BatchNorm1d`` applied to ``x.transpose(1, 2)`` and transposed back,
    without the two transposes: the natural layout of transformer and RNN activations.
    """

    _ranks = (3,)
    _channel_dim = -1

    def _view(self, x: Tensor) -> tuple[int, int, int]:
        return (x.shape[0] * x.shape[1], x.shape[2], 1)


class TorchSequenceBatchNorm(nn.BatchNorm1d):
    """torch.nn's own BatchNorm1d applied to a channel-last ``(N, L, C)`` input.

    The torch-side twin of :class:`SequenceBatchNorm` (same arguments and state).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 3:
            raise ValueError(f"expected 3D input (got {input.dim()}D input)")
        return super().forward(input.transpose(1, 2)).transpose(1, 2)
