"""Give a fresh network's normalization layers non-trivial state.

Freshly constructed norm layers have ``gamma = 1``, ``beta = 0``, ``running_mean = 0`` and
``running_var = 1``: a test comparing two implementations could not tell a layer that ignores
its affine or its running statistics from a correct one.  :func:`calibrate` randomizes every
affine (and the switchable logits) and then runs training-mode forward passes so that running
statistics hold real data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from normport.models.table import normport_types

__all__ = ["NORM_TYPES", "calibrate", "randomize_norms", "warm_up"]

# Every normport normalization layer, from the one layer table.
NORM_TYPES: tuple[type[nn.Module], ...] = normport_types()


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """``weight ~ 1 + 0.1 N(0, 1)``, ``bias ~ 0.1 N(0, 1)``, switchable logits ``~ N(0, 1)``."""

    def randn(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    for module in model.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is not None:
            weight.copy_(1.0 + 0.1 * randn(weight))
        if bias is not None:
            bias.copy_(0.1 * randn(bias))
        for name in ("mean_weight", "var_weight"):
            logits = getattr(module, name, None)
            if logits is not None:
                logits.copy_(randn(logits))


@torch.no_grad()
def warm_up(model: nn.Module, batches: Iterable[tuple[Tensor, ...]]) -> None:
    """One training-mode forward pass per batch (updates running statistics), then eval."""
    model.train()
    for batch in batches:
        model(*batch)
    model.eval()


def calibrate(
    model: nn.Module, generator: torch.Generator, batches: Iterable[tuple[Tensor, ...]]
) -> None:
    """:func:`randomize_norms`, then :func:`warm_up` on ``batches``."""
    randomize_norms(model, generator)
    warm_up(model, batches)
