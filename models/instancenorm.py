"""Instance normalization: statistics over the spatial axes, per sample and channel.

.. math::

    y_{nc} = \\frac{x_{nc} - \\mathrm{E}[x_{nc}]}{\\sqrt{\\mathrm{Var}[x_{nc}] + \\epsilon}}
    \\cdot \\gamma_c + \\beta_c

With ``track_running_stats=True``, training updates the running statistics with the batch
average of the per-instance mean and unbiased variance, and eval uses them.  Exactly as
``torch.nn.InstanceNorm*d`` (``F.instance_norm``), ``num_batches_tracked`` is never advanced
and ``momentum=None`` therefore means a factor of 0 (the running statistics stay put), not a
cumulative average; normport keeps that to stay a drop-in twin.  Unbatched ``(C, *S)`` inputs
are accepted like in torch.nn.
"""

from __future__ import annotations

import math

from torch import Tensor

from normport.models._affine import affine_view
from normport.models._base import NormBase, with_defaults
from normport.models._functional import affine_from_stats, standardize
from normport.models._shapes import channel_shape, check_rank

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


@with_defaults(affine=False, track_running_stats=False)  # torch.nn.InstanceNorm*d's defaults
class _InstanceNorm(NormBase):
    _spatial_dims = 0

    def _update_factor(self) -> float | None:
        # F.instance_norm neither counts batches nor knows the cumulative average.
        if not (self.training and self.track_running_stats):
            return None
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        batched = self._spatial_dims + 2
        check_rank(input, (batched - 1, batched))
        x = input if input.dim() == batched else input.unsqueeze(0)
        self._check_channels(x, 1)
        per_channel = channel_shape(x, 1)
        weight, bias = affine_view(self, per_channel)
        if not self._uses_batch_stats():
            mean, var = self._running(per_channel)
            y = affine_from_stats(x, mean, var, weight, bias, self.eps)
        else:
            n, c, spatial = x.shape[0], x.shape[1], math.prod(x.shape[2:])
            if spatial <= 1:
                raise ValueError(
                    "Expected more than 1 spatial element when training, got input size "
                    f"{input.size()}"
                )
            factor = self._update_factor()
            y, mean, var = standardize(x, (1, n * c, spatial), weight, bias, self.eps)
            if factor is not None:
                # Running statistics blend the batch average of per-instance statistics.
                self._update_running(
                    mean.view(n, c).mean(0), var.view(n, c).mean(0), spatial, factor
                )
        return y if input.dim() == batched else y.squeeze(0)


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over ``(N, C, L)`` or ``(C, L)``; twin of nn.InstanceNorm1d."""

    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over ``(N, C, H, W)`` or ``(C, H, W)``; twin of nn.InstanceNorm2d."""

    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization over ``(N, C, D, H, W)`` or ``(C, D, H, W)``."""

    _spatial_dims = 3
