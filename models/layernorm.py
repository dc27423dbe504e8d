"""Layer normalization and RMS normalization: statistics over the trailing ``k`` axes.

LayerNorm (Ba et al., 2016):

.. math::

    y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\odot \\gamma + \\beta

RMSNorm (Zhang & Sennrich, 2019), no centring:

.. math::

    y = \\frac{x}{\\sqrt{\\mathrm{E}[x^2] + \\epsilon}} \\odot \\gamma

``E`` and ``Var`` (biased) run over the last ``len(normalized_shape)`` axes, separately for
every leading index, so the output of one sample never depends on its batch-mates and training
equals eval.  ``gamma`` and ``beta`` have shape ``normalized_shape``.  For RMSNorm,
``eps=None`` means ``torch.finfo(x.dtype).eps`` as in torch.nn.RMSNorm.

Example: ``LayerNorm(3)`` maps ``[1., 2., 3.]`` to ``[-1.2247, 0., 1.2247]`` (times gamma, plus
beta).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normport.models._affine import register_affine, reset_affine
from normport.models._base import check_eps
from normport.models._functional import standardize
from normport.models._fused import uses_fused

__all__ = ["LayerNorm", "RMSNorm"]


def _as_shape(normalized_shape: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(normalized_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
    return shape


class _TrailingNorm(nn.Module):
    """Shared state, shape check and view for norms over the trailing ``normalized_shape`` axes.

    ``weight`` and ``bias`` (if any) have shape ``normalized_shape``; the leaves validate their
    arguments and say whether there is a bias at all.
    """

    def __init__(
        self,
        normalized_shape: tuple[int, ...],
        eps: float | None,
        elementwise_affine: bool,
        bias: bool | None,
        device: Any,
        dtype: Any,
    ) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(
            self, normalized_shape, elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(
            **self.__dict__
        )

    def _view(self, x: Tensor) -> tuple[int, int, int]:
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != self.normalized_shape:
            expected = ", ".join(str(d) for d in self.normalized_shape)
            raise ValueError(
                f"Given normalized_shape={list(self.normalized_shape)}, expected input with "
                f"shape [*, {expected}], but got input of size {list(x.shape)}"
            )
        inner = math.prod(self.normalized_shape)
        return (1, x.numel() // inner if inner else 0, inner)


class LayerNorm(_TrailingNorm):
    """Twin of ``torch.nn.LayerNorm``.

    Arguments as torch.nn: ``(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``.

    Which path runs: a CPU float32 / float64 input with parameters of its dtype (no tensor
    subclass, not empty) goes through ATen's fused ``F.layer_norm`` (forward, backward and
    double backward), which computes the same normalization (see :mod:`models._fused`);
    everything else (float16 / bfloat16, other devices, mixed dtypes) through
    :func:`models._functional.standardize`, which is also the reference the fused path is
    tested against.
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        shape = _as_shape(normalized_shape)
        super().__init__(shape, check_eps(eps), elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        view = self._view(input)  # checks the shape on either path
        if uses_fused(input, self.weight, self.bias):
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return standardize(input, view, self.weight, self.bias, self.eps)[0]


class RMSNorm(_TrailingNorm):
    """Twin of ``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True)``.

    Always :func:`models._functional.standardize` (``center=False``): on the CPU torch.nn's
    RMSNorm is itself a composite of primitive ops, with no fused kernel to dispatch to.
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        shape = _as_shape(normalized_shape)
        eps = None if eps is None else check_eps(eps)
        # bias=None: no ``bias`` attribute at all, as torch.nn.RMSNorm.
        super().__init__(shape, eps, elementwise_affine, None, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        view = self._view(input)
        return standardize(input, view, self.weight, None, eps, center=False)[0]
