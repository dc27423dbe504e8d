"""The affine parameters of every layer: ``weight`` (:math:`\\gamma`), ``bias`` (:math:`\\beta`).

.. math::

    y = \\hat{x} \\cdot \\gamma + \\beta, \\qquad \\gamma \\leftarrow 1, \\quad \\beta \\leftarrow 0
    \\quad \\text{(on reset)}

Names, shapes and initial values are torch.nn's.  A disabled parameter is registered as
``None`` (``module.weight`` exists either way, and state_dict keys match torch.nn's); RMSNorm
has no ``bias`` attribute at all, like ``torch.nn.RMSNorm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["affine_view", "register_affine", "reset_affine"]


def register_affine(
    module: nn.Module,
    shape: tuple[int, ...],
    affine: bool,
    *,
    bias: bool | None = True,
    device: Any = None,
    dtype: Any = None,
) -> None:
    """Register ``weight`` and ``bias`` of ``shape`` on ``module``, uninitialised.

    ``affine=False`` registers both as ``None``.  With ``affine=True``, ``bias=False`` registers
    only the bias as ``None`` (``LayerNorm(bias=False)``) and ``bias=None`` registers no bias
    attribute at all (RMSNorm).  Values are set by :func:`reset_affine`.
    """
    factory = {"device": device, "dtype": dtype}
    if affine:
        module.weight = nn.Parameter(torch.empty(shape, **factory))
    else:
        module.register_parameter("weight", None)
    if bias is not None:
        has_bias = affine and bias
        module.register_parameter(
            "bias", nn.Parameter(torch.empty(shape, **factory)) if has_bias else None
        )


def reset_affine(module: nn.Module) -> None:
    """:math:`\\gamma = 1`, :math:`\\beta = 0` for those of ``weight`` and ``bias`` that exist."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def affine_view(module: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
    """``module``'s per-channel ``(C,)`` weight and bias viewed as ``shape`` (see
    :func:`models._shapes.channel_shape`: ``(C, 1, 1)`` against ``(N, C, H, W)``); None stays
    None."""
    weight = None if module.weight is None else module.weight.view(shape)
    bias = None if module.bias is None else module.bias.view(shape)
    return weight, bias
