"""Group normalization (Wu & He, 2018): statistics per sample over groups of channels.

.. math::

    y_{nc} = \\frac{x_{nc} - \\mathrm{E}[x_{ng}]}{\\sqrt{\\mathrm{Var}[x_{ng}] + \\epsilon}}
    \\cdot \\gamma_c + \\beta_c, \\qquad g = \\lfloor c \\cdot G / C \\rfloor

``E`` and ``Var`` (biased) run over the ``C / G`` channels of the group and all spatial
positions.  The affine parameters are **per channel** (as torch.nn.GroupNorm and ONNX's
GroupNormalization-21), not per group (the deprecated GroupNormalization-18).  No running
statistics: training and eval compute the same thing.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from normport.models._affine import affine_view, register_affine, reset_affine
from normport.models._base import check_eps, check_positive_int
from normport.models._functional import standardize
from normport.models._fused import group_norm, uses_fused_group_norm
from normport.models._shapes import channel_shape

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    """Twin of ``torch.nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True)``.

    Which path runs: a CPU float32 / float64 input contiguous in the default layout, with
    parameters of its dtype (no tensor subclass, not empty), goes through ATen's fused kernel:
    with its folded affine (torch.nn.GroupNorm's output) where every group's
    :math:`|\\mu_{ng}|\\, r_{ng} \\le 4` and none is constant, else *without* affine, which
    computes :math:`(x - \\mu_{ng})\\, r_{ng}`, then ``* weight + bias`` in place; its
    backward is ATen's (:mod:`models._fused`, with the error bound that decides).  Everything
    else (float16 / bfloat16, channels-last, other devices, mixed dtypes) runs
    :func:`models._functional.standardize`, also the reference the fused path is tested
    against.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_groups", num_groups)
        check_positive_int("num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels must be divisible by num_groups, got num_channels={num_channels} "
                f"and num_groups={num_groups}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = check_eps(eps)
        self.affine = affine
        register_affine(self, (num_channels,), affine, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def extra_repr(self) -> str:
        return "{num_groups}, {num_channels}, eps={eps}, affine={affine}".format(**self.__dict__)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"expected input's size at dim=1 to match num_channels ({self.num_channels}), "
                f"but got: {x.shape[1]}."
            )
        if uses_fused_group_norm(x, self.weight, self.bias):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        per_channel = channel_shape(x, 1)
        weight, bias = affine_view(self, per_channel)
        n, g = x.shape[0], self.num_groups
        view = (1, n * g, (self.num_channels // g) * math.prod(x.shape[2:]))
        return standardize(x, view, weight, bias, self.eps)[0]
